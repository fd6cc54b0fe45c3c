"""A received DICOM dataset -> gray frames plus the metadata a mask consumer needs.

The display pipeline (Modality LUT, VOI LUT, MONOCHROME1 inversion) is imageio's, so a frame
that arrives over the network looks exactly like the same file read from disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
_PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
_TIME_KEYS = ("AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime")
# Study attributes a derived object (the bridge's DICOM SEG) must repeat to join the same study.
_STUDY_KEYS = ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


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
    for kw in (*_UID_KEYS, *_PATIENT_KEYS, *_STUDY_KEYS, *_TIME_KEYS, "Modality"):
        v = ds.get(kw)
        if v is not None and str(v) != "":
            meta[kw] = str(v)
    ft = _first_float(ds, "FrameTime")
    if ft is not None and ft > 0:
        meta["FrameTime"] = ft
    return meta


def dataset_frames(ds: Any) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Every frame of a dataset; raises imageio.ImageReadError when it cannot be understood.

    Only ImageReadError leaves here: pydicom raises ValueError, TypeError, IndexError, ... for
    attributes a sender got wrong (found by tests/test_fuzz.py, e.g. Window Width 0), and every
    caller (the SCP's 0xC000 answer, the replay reader) handles exactly one error type.
    """
    try:
        images = read_dicom_frames(ds)
        extra = dataset_meta(ds)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"DICOM data set cannot be decoded: {type(exc).__name__}: {exc}") from exc
    out = []
    for img in images:
        meta = {**img.meta, **extra}
        if meta.get("source_path") == "<dataset>":  # received over the network: there is no file
            del meta["source_path"]
        out.append((img.pixels, meta))
    return out
