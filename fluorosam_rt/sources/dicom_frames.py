"""A received DICOM dataset -> gray frames plus the metadata a mask consumer needs.

The display pipeline (Modality LUT, VOI LUT, MONOCHROME1 inversion) is imageio's, so a frame
that arrives over the network looks exactly like the same file read from disk.
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO

import numpy as np

from bridge.protocol import PATIENT_KEYS, STUDY_KEYS

from ..imageio import ImageReadError, read_dicom_frames

# Storage SOP classes a C-arm or radiography system sends (PS3.4 B.5).
XRAY_STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.12.1": "XRayAngiographicImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "EnhancedXAImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.2": "XRayRadiofluoroscopicImageStorage",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "EnhancedXRFImageStorage",
    "1.2.840.10008.5.1.4.1.1.1.1": "DigitalXRayImageStorageForPresentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DigitalXRayImageStorageForProcessing",
    "1.2.840.10008.5.1.4.1.1.1": "ComputedRadiographyImageStorage",
    "1.2.840.10008.5.1.4.1.1.7": "SecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.7.2": "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "1.2.840.10008.5.1.4.1.1.7.3": "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
}

# Kept for the DICOM SEG that a downstream archive writes (issue 7); never logged.
_UID_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
_TIME_KEYS = ("AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime")


def _first_float(ds: Any, keyword: str) -> float | None:
    v = ds.get(keyword)
    if v is None or v == "":
        return None
    try:
        return float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v)
    except (TypeError, ValueError, IndexError):
        return None


def dataset_meta(ds: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for kw in (*_UID_KEYS, *PATIENT_KEYS, *STUDY_KEYS, *_TIME_KEYS, "Modality"):
        v = ds.get(kw)
        if v is not None and str(v) != "":
            meta[kw] = str(v)
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts:  # how the frame arrived: a consumer may treat lossy-compressed frames differently
        meta["TransferSyntaxUID"] = str(ts)
    if str(ds.get("LossyImageCompression", "")) == "01":
        meta["LossyImageCompression"] = "01"
    ft = _first_float(ds, "FrameTime")
    if ft is not None and ft > 0:
        meta["FrameTime"] = ft
    return meta


_SAMPLES_FOR_PHOTOMETRIC = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
    "YBR_PARTIAL_420": 3,
}


def check_image_attributes(ds: Any) -> None:
    """Refuse Image Pixel attributes that contradict each other (PS3.3 C.7.6.3).

    A decoder would otherwise guess: an "RGB" image with one sample per pixel decodes as gray,
    a palette image without its LUTs as raw indices. Either would be segmented and published as
    if it were a sensible X-ray, which is worse than refusing it with a reason.
    """
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    stored = int(ds.get("BitsStored", bits) or bits)
    if photometric and photometric not in _SAMPLES_FOR_PHOTOMETRIC:
        raise ImageReadError(f"unknown PhotometricInterpretation {photometric!r}")
    want = _SAMPLES_FOR_PHOTOMETRIC.get(photometric or "MONOCHROME2")
    if spp != want:
        raise ImageReadError(
            f"PhotometricInterpretation {photometric!r} needs SamplesPerPixel {want}, not {spp}"
        )
    if photometric == "PALETTE COLOR" and "RedPaletteColorLookupTableDescriptor" not in ds:
        raise ImageReadError("PALETTE COLOR image without its palette color lookup tables")
    if bits != 1 and (bits <= 0 or bits % 8 or bits > 64):
        raise ImageReadError(f"BitsAllocated {bits} is not 1 or a multiple of 8 up to 64")
    if not 0 < stored <= bits:
        raise ImageReadError(f"BitsStored {stored} does not fit in BitsAllocated {bits}")


def dataset_frames(ds: Any) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Every frame of a dataset; raises imageio.ImageReadError when it cannot be understood.

    Only ImageReadError leaves here: pydicom raises ValueError, TypeError, IndexError, ... for
    attributes a sender got wrong (found by tests/test_fuzz.py, e.g. Window Width 0), and every
    caller (the SCP's 0xC000 answer, the replay reader) handles exactly one error type.
    """
    try:
        try:
            check_image_attributes(ds)
        except ImageReadError as exc:
            name = str(getattr(ds, "filename", None) or "<dataset>")
            raise ImageReadError(f"cannot read image {name!r}: {exc}") from exc
        images = read_dicom_frames(ds)
        extra = dataset_meta(ds)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"DICOM data set cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return [(img.pixels, {**img.meta, **extra}) for img in images]


def dicom_file_frames(src: str | os.PathLike[str] | BinaryIO) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """A DICOM file (a path, or a binary file object with the file's bytes) -> its frames.

    Read as the node reads files (pydicom with ``force=True``: preamble and file meta optional),
    then :func:`dataset_frames`. Raises only ImageReadError: pydicom itself raises
    BytesLengthException, struct.error, ... on corrupt bytes (found by fuzz/fuzz_dicom.py: a
    corrupt replay file made ``fluorosam-rt serve`` print a traceback instead of one line).
    """
    import pydicom

    name = os.fspath(src) if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "<bytes>")
    try:
        ds = pydicom.dcmread(src, force=True)
    except Exception as exc:
        raise ImageReadError(
            f"cannot read image {name!r}: corrupt or unreadable DICOM data ({type(exc).__name__}: {exc})"
        ) from exc
    return dataset_frames(ds)
