"""Archive the mask stream as DICOM Segmentation objects that a PACS files next to the source.

Only frames that came in over DICOM can be archived: a SEG must name the patient, study and
the exact source instance (and frame) it was derived from, and only those frames carry the
UIDs. Everything the SEG needs travels in the message header's ``source`` map, so the archive
needs no access to the node or the original files.

Choices and why:

* one SEG per archived frame, one segment per prompt (absent prompts included, empty), so the
  SEG says what was asked as well as what was found;
* masks are brought back to source resolution (nearest neighbour, as the node downsampled by
  blocks), because a SEG frame must be pixel-for-pixel with its source frame;
* a projection image has no frame of reference, and highdicom then accepts only single-frame
  sources; for a frame of a multi-frame cine the SEG is built as if from a single frame and
  the reference is then pointed at that frame (ReferencedFrameNumber), which is what the
  standard asks for a derivation from one frame;
* each prompt keeps one tracking UID for the archive's lifetime, so "left lung" across frames
  is one tracked finding;
* the same source frame is archived once, however often it is replayed.

Needs the ``bridge`` extra (highdicom, pydicom; pynetdicom for C-STORE), never torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from .codes import CodeTriple, code_for_prompt
from .protocol import MaskMessage

log = logging.getLogger(__name__)

MANUFACTURER = "fluorosam-rt"
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Copied from the header into the reconstructed source so highdicom can repeat them in the SEG.
_COPIED = (
    *_REQUIRED_UIDS,
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
_TYPE2 += ("StudyID", "AccessionNumber", "ReferringPhysicianName")


class NotArchivable(ValueError):
    """The message cannot become a SEG (not from DICOM, or the header lacks a needed UID)."""


def _software_version() -> str:
    try:
        return metadata.version("fluorosam-rt")
    except metadata.PackageNotFoundError:
        return "unknown"


def source_dataset(msg: MaskMessage) -> Dataset:
    """The source image's identifying attributes, rebuilt from the header (no pixels needed)."""
    src = msg.source
    if src.get("source") != "dicom":
        raise NotArchivable(f"frame {msg.frame_id} came from {src.get('source')!r}, not over DICOM")
    missing = [k for k in _REQUIRED_UIDS if not src.get(k)]
    if missing:
        raise NotArchivable(f"frame {msg.frame_id}: the header lacks {', '.join(missing)}")
    ds = Dataset()
    for kw in _TYPE2:
        setattr(ds, kw, "")
    for kw in _COPIED:
        if src.get(kw):
            setattr(ds, kw, str(src[kw]))
    ds.Modality = str(src.get("Modality") or "XA")
    ds.Rows, ds.Columns = msg.source_shape
    ds.NumberOfFrames = 1  # see the module notes: the reference to a cine frame is added after
    # highdicom reads the pixel measures of a multi-frame-capable IOD (XA, RF) from the shared
    # functional groups, which a classic XA object lacks; an empty item satisfies it and is
    # removed from the SEG again (a projection has no plane for Pixel Measures to describe).
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([Dataset()])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def full_resolution(mask: np.ndarray, source_shape: tuple[int, int], downsample: int) -> np.ndarray:
    """Undo the node's block downsampling: mask pixel (i, j) covers a d x d block of the source."""
    if downsample == 1:
        return mask
    up = np.repeat(np.repeat(mask, downsample, axis=0), downsample, axis=1)
    return up[: source_shape[0], : source_shape[1]]


def _concept(c: CodeTriple) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(c.value, c.scheme, c.meaning)


@dataclass
class SegArchive:
    """Turns mask messages into SEG files in ``out_dir`` (and optionally sends them to a PACS)."""

    out_dir: Path
    model: str = ""  # used when the header does not name the model
    store: Any = None  # a callable(Path) -> None, e.g. CStoreTarget; None: files only
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    _series: dict[str, str] = field(default_factory=dict)  # source series UID -> SEG series UID
    _tracking: dict[str, str] = field(default_factory=dict)  # prompt id -> tracking UID
    _seen: set[tuple[str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def build(self, msg: MaskMessage) -> hd.seg.Segmentation:
        """The SEG for one message; raises NotArchivable when it cannot have one."""
        src = source_dataset(msg)
        if not msg.prompts:
            raise NotArchivable(f"frame {msg.frame_id} has no prompts, so nothing to segment")
        model = msg.model or self.model or "unknown model"
        algorithm = hd.AlgorithmIdentificationSequence(
            name="fluorosam-rt",
            family=codes.cid7162.ArtificialIntelligence,
            version=model[:64],
            source=f"fluorosam-rt {_software_version()}"[:64],
        )
        descriptions = []
        for i, p in enumerate(msg.prompts):
            coding = code_for_prompt(p.text)
            d = hd.seg.SegmentDescription(
                segment_number=i + 1,
                segment_label=coding.label[:64] or p.id[:64],
                segmented_property_category=_concept(coding.category),
                segmented_property_type=_concept(coding.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=self._tracking.setdefault(p.id, generate_uid()),
                tracking_id=p.id[:64],
            )
            if coding.laterality is not None:
                d.SegmentedPropertyTypeModifierCodeSequence = DicomSequence([_concept(coding.laterality)])
            state = "present" if p.present else "not present"
            d.SegmentDescription = f"prompt: {p.text}; predicted IoU {p.score:.3f}; {state}"[:64]
            descriptions.append(d)
        stack = np.stack(
            [full_resolution(p.mask, msg.source_shape, msg.downsample) for p in msg.prompts], axis=-1
        )[None].astype(np.uint8)
        series_uid = self._series.setdefault(str(msg.source["SeriesInstanceUID"]), generate_uid())
        seg = hd.seg.Segmentation(
            source_images=[src],
            pixel_array=stack,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=990,
            sop_instance_uid=generate_uid(),
            instance_number=self.written + 1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model[:64],
            software_versions=_software_version(),
            device_serial_number=msg.stream[:64] or "unknown",
            omit_empty_frames=False,
            content_label="FLUOROSAM",
            content_description=f"fluorosam-rt masks, stream {msg.stream}, frame {msg.frame_id}"[:64],
            series_description="fluorosam-rt segmentation",
        )
        self._point_at_source_frame(seg, msg)
        # General Image: Type 2C without an Image Orientation (Patient), which a projection lacks.
        seg.PatientOrientation = msg.source.get("PatientOrientation", "") or ""
        for item in seg.get("SharedFunctionalGroupsSequence", []):
            measures = item.get("PixelMeasuresSequence")
            if measures is not None and not any(len(m) for m in measures):
                del item.PixelMeasuresSequence
        return seg

    @staticmethod
    def _point_at_source_frame(seg: hd.seg.Segmentation, msg: MaskMessage) -> None:
        n_frames = int(msg.source.get("num_frames") or 1)
        if n_frames <= 1:
            return
        frame_number = int(msg.source.get("frame_index") or 0) + 1
        for item in seg.PerFrameFunctionalGroupsSequence:
            for deriv in item.get("DerivationImageSequence", []):
                for ref in deriv.get("SourceImageSequence", []):
                    ref.ReferencedFrameNumber = frame_number
        for series in seg.get("ReferencedSeriesSequence", []):
            for inst in series.get("ReferencedInstanceSequence", []):
                inst.ReferencedFrameNumber = frame_number

    def handle(self, msg: MaskMessage) -> Path | None:
        """Archive one message; returns the file, or None when skipped (counted by reason)."""
        key = (str(msg.source.get("SOPInstanceUID", "")), int(msg.source.get("frame_index") or 0))
        if key in self._seen:
            self._skip("already_archived")
            return None
        try:
            seg = self.build(msg)
        except NotArchivable as exc:
            self._skip("not_dicom" if "not over DICOM" in str(exc) else "not_archivable")
            log.debug("%s", exc)
            return None
        self._seen.add(key)
        path = self.out_dir / f"seg_{msg.stream}_{msg.frame_id:08d}_{seg.SOPInstanceUID}.dcm"
        seg.save_as(path, enforce_file_format=True)
        self.written += 1
        if self.store is not None:
            self.store(path)
        return path


@dataclass
class CStoreTarget:
    """Sends each SEG to a PACS with C-STORE; a failure is logged and counted, never fatal."""

    host: str
    port: int
    called_ae: str = "ANY-SCP"
    calling_ae: str = "FLUOROSAM"
    timeout_s: float = 30.0
    sent: int = 0
    failed: int = 0

    def __call__(self, path: Path) -> None:
        from pydicom import dcmread
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage

        ae = AE(ae_title=self.calling_ae)
        ae.add_requested_context(SegmentationStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            self.failed += 1
            log.warning("C-STORE: no association with %s@%s:%d", self.called_ae, self.host, self.port)
            return
        try:
            status = assoc.send_c_store(dcmread(path))
            code = int(getattr(status, "Status", -1)) if status else -1
        finally:
            assoc.release()
        if code == 0:
            self.sent += 1
        else:
            self.failed += 1
            log.warning("C-STORE of %s answered status 0x%04X", path.name, code & 0xFFFF)


def run_archive(
    subscriber: Any,
    archive: SegArchive,
    max_messages: int | None = None,
    idle_timeout: float | None = None,
    min_interval_s: float = 0.0,
) -> int:
    """Archive until max_messages were read or nothing came for idle_timeout seconds."""
    from .subscriber import SubscriberTimeout

    n, last_write = 0, 0.0
    while max_messages is None or n < max_messages:
        try:
            msg = subscriber.receive(timeout=idle_timeout, newest=False)
        except SubscriberTimeout:
            break
        n += 1
        if min_interval_s and time.monotonic() - last_write < min_interval_s:
            archive._skip("rate_limited")
            continue
        if archive.handle(msg) is not None:
            last_write = time.monotonic()
    return n
