"""atheris: raw bytes -> ``pydicom.dcmread`` -> ``fluorosam_rt.sources.dicom_frames.dataset_frames``.

The bytes are a DICOM file as the replay reader opens it: ``dicom_file_frames`` reads them with
pydicom (``force=True``: preamble and file meta optional) and hands the data set to
``dataset_frames``, as the SCP does with what it receives. Contract: finite, non-empty 2-D
frames, or ``ImageReadError`` with a message (the SCP's 0xC000, the replay reader's
SourceError). Any other exception is a crash.

    .venv/bin/python fuzz/fuzz_dicom.py -runs=100000
"""

from __future__ import annotations

import io
import sys

import atheris

with atheris.instrument_imports(include=["pydicom", "fluorosam_rt"]):
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

    from fluorosam_rt.imageio import ImageReadError
    from fluorosam_rt.sources.dicom_frames import dicom_file_frames

import harness


def test_one_input(data: bytes) -> None:
    try:
        frames = dicom_file_frames(io.BytesIO(data))
    except ImageReadError as exc:
        if not str(exc):
            raise AssertionError("ImageReadError without a message") from exc
        return
    if not frames:
        raise AssertionError("no frames and no error")
    for pixels, _meta in frames:
        if pixels.ndim != 2 or pixels.size == 0:
            raise AssertionError(f"frame of shape {pixels.shape}")
        if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
            raise AssertionError("non-finite pixels")


XA = "1.2.840.10008.5.1.4.1.1.12.1"


def _dataset(
    rows: int, cols: int, frames: int, bits: int, photometric: str, **attrs: object
) -> pydicom.Dataset:
    spp = 3 if photometric == "RGB" else 1
    rng = np.random.default_rng(rows * cols + frames)
    dtype = np.uint8 if bits == 8 else np.uint16
    pixels = rng.integers(0, 200, (frames, rows, cols, spp), dtype=dtype)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = XA, "1.2.3.4", "XA"
    ds.PatientID = "FUZZ"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if spp > 1:
        ds.PlanarConfiguration = 0
    ds.PixelData = pixels.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def seeds() -> list[bytes]:
    datasets = [
        _dataset(4, 4, 1, 8, "MONOCHROME2"),
        _dataset(3, 5, 2, 16, "MONOCHROME1", WindowCenter="100", WindowWidth="200", FrameTime=50),
        _dataset(
            4,
            3,
            1,
            16,
            "MONOCHROME2",
            RescaleSlope="2",
            RescaleIntercept="-1024",
            ImagerPixelSpacing=[0.3, 0.3],
        ),
        _dataset(2, 2, 1, 8, "RGB"),
    ]
    rle = _dataset(8, 8, 2, 8, "MONOCHROME2")
    rle.compress(RLELossless)
    datasets.append(rle)
    implicit = _dataset(4, 4, 1, 16, "MONOCHROME2")
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    datasets.append(implicit)
    out = []
    for ds in datasets:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    bare = io.BytesIO()  # no preamble and no file meta, as a data set arrives over the network
    datasets[0].save_as(bare, enforce_file_format=False, implicit_vr=False, little_endian=True)
    out.append(bare.getvalue())
    return out


if __name__ == "__main__":
    harness.quiet()
    harness.run("dicom", test_one_input, seeds())
    sys.exit(0)
