"""Read X-ray images from disk into a single 2-D gray array plus acquisition metadata.

Design decisions (the why):

* **Content decides the decoder, the extension only breaks ties.** Files from PACS exports and
  ad-hoc scripts are often misnamed (``.dcm`` PNGs, DICOM files with no extension), so the magic
  bytes are sniffed first (DICOM: ``DICM`` at offset 128; PNG, JPEG, TIFF, BMP signatures). Only
  when no signature matches does the extension pick a reader (``.dcm`` is then read as a DICOM
  file without preamble).
* **Native dtype is kept** (uint8 / uint16 / float32) so that the preprocessor sees the real
  dynamic range; the k-means windowing is affine-invariant, so no rescaling is needed here.
  Other integer/float dtypes become float32. RGB(A) sources become float32 gray with the
  ITU-R 601 weights 0.299/0.587/0.114 (what PIL's ``convert("F")`` in the official CLI does);
  an RGB image whose three channels are identical is returned as that channel in its native
  dtype, because the weighted sum is then the identity and float32 would only waste memory.
  Alpha is dropped.
* **DICOM display pipeline**: stored values → Modality LUT (rescale or LUT sequence) → VOI LUT
  (LUT sequence preferred over window centre/width, as pydicom and most viewers do) →
  MONOCHROME1 inversion. After this, bright means dense (bone), the usual X-ray display
  convention that models are trained on. The inversion is ``lo + hi - v`` over the nominal
  output range of the last applied stage (the VOI window's output range, the LUT's data range,
  or the stored-value range), so it does not depend on the image content.
* **Compressed DICOM**: every transfer syntax in ``dicom_codecs.SYNTAXES`` whose decoder is
  installed; the pixel data is checked before decoding (``dicom_codestream``), so a truncated
  stream or a frame count that disagrees with the data is an error, not a garbled image.
* **Multi-frame DICOM**: :func:`read_dicom_frames` returns every frame (enhanced objects with
  each frame's own window, rescale, geometry and time); :func:`read_image`
  returns only frame 0 (and decodes only that frame), because the segmentation node works on
  single frames. ``meta["num_frames"]`` tells the caller that more frames exist.
* **Errors** are :class:`ImageReadError` (a ``ValueError``) whose message names the file and the
  cause, so an operator can fix the input without reading a traceback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .image_errors import ImageReadError

__all__ = ["ImageReadError", "XrayImage", "read_dicom_frames", "read_image"]

_RGB_WEIGHTS = (0.299, 0.587, 0.114)
_DICOM_EXTS = {".dcm", ".dicom", ".dic"}
_RASTER_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}
_TIFF_EXTS = {".tif", ".tiff"}


@dataclass
class XrayImage:
    """A decoded 2-D gray X-ray frame (bright = dense) and what is known about its acquisition."""

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _fail(path: str | os.PathLike[str], cause: str) -> ImageReadError:
    return ImageReadError(f"cannot read image {os.fspath(path)!r}: {cause}")


def _sniff(head: bytes) -> str | None:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    return None


def _native(arr: np.ndarray) -> np.ndarray:
    """Keep uint8/uint16/float32; map everything else to float32 (exact for <=16-bit integers)."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    return np.ascontiguousarray(arr, dtype=np.float32)


def _to_gray(arr: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Collapse HxW, HxWx1, HxWx2 (gray+alpha), HxWx3 (RGB), HxWx4 (RGBA) to HxW."""
    if arr.ndim == 2:
        return _native(arr)
    if arr.ndim != 3:
        raise _fail(path, f"expected a 2-D image, got an array of shape {arr.shape}")
    c = arr.shape[2]
    if c in (1, 2):
        return _native(arr[:, :, 0])
    if c in (3, 4):
        rgb = arr[:, :, :3]
        r, g, b = rgb[:, :, 0], rgb[:, :, 1], rgb[:, :, 2]
        if np.array_equal(r, g) and np.array_equal(r, b):
            return _native(r)
        gray = _RGB_WEIGHTS[0] * r.astype(np.float64)
        gray += _RGB_WEIGHTS[1] * g
        gray += _RGB_WEIGHTS[2] * b
        return gray.astype(np.float32)
    raise _fail(path, f"unsupported number of channels {c} (shape {arr.shape})")


def _check_size(arr: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    if arr.size == 0 or 0 in arr.shape:
        raise _fail(path, f"image has zero size (shape {arr.shape})")
    return arr


def _read_raster(path: Path, kind: str) -> XrayImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if mode == "1" else "RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _fail(path, f"corrupt or unreadable {kind.upper()} data ({exc})") from exc
    if arr.dtype == np.int32 and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # PIL's mode "I" for 16-bit PNG in some versions
    pixels = _check_size(_to_gray(arr, path), path)
    meta: dict[str, Any] = {
        "source_path": str(path),
        "format": kind,
        "source_mode": mode,
        "num_frames": 1,
        "frame_index": 0,
    }
    return XrayImage(pixels=pixels, meta=meta)


def _read_tiff(path: Path) -> XrayImage:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.pages:
                raise _fail(path, "TIFF file has no pages")
            n_pages = len(tf.pages)
            page = tf.pages[0]
            arr = page.asarray()
            photometric = getattr(page.photometric, "name", str(page.photometric))
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise _fail(path, f"corrupt or unreadable TIFF data ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar RGB
    if photometric == "MINISWHITE" and arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
        arr = np.iinfo(arr.dtype).max - arr  # display convention: bright = dense
    pixels = _check_size(_to_gray(arr, path), path)
    meta: dict[str, Any] = {
        "source_path": str(path),
        "format": "tiff",
        "source_mode": photometric,
        "num_frames": n_pages,
        "frame_index": 0,
    }
    return XrayImage(pixels=pixels, meta=meta)


# --------------------------------------------------------------------------- DICOM


_NO_FILE = "<dataset>"  # the name a data set that is not a file goes by in messages


def _ds_float_list(ds: Any, keyword: str) -> list[float] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _dicom_meta(ds: Any, path: str) -> dict[str, Any]:
    # A data set received over the network (no file: "<dataset>") has no source path.
    meta: dict[str, Any] = {"source_path": path} if path != _NO_FILE else {}
    meta["format"] = "dicom"
    for kw in (
        "Modality",
        "PhotometricInterpretation",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "PatientID",
    ):
        value = ds.get(kw)
        if value is not None and str(value) != "":
            meta[kw] = str(value)
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _ds_float_list(ds, kw)
        if values is not None:
            # Non-positive spacing (e.g. "0\0" in RG1_J2KI) is present-but-invalid: None, so that
            # callers cannot silently divide by zero.
            meta[kw] = tuple(values) if len(values) == 2 and min(values) > 0 else None
    for kw in (
        "DistanceSourceToDetector",
        "DistanceSourceToPatient",
        "PositionerPrimaryAngle",
        "PositionerSecondaryAngle",
    ):
        values = _ds_float_list(ds, kw)
        if values:
            meta[kw] = values[0]
    return meta


def _lut_data_range(item: Any) -> tuple[float, float] | None:
    data = item.get("LUTData")
    if data is None:
        return None
    values = np.asarray(data if not isinstance(data, bytes) else np.frombuffer(data, np.uint16))
    if values.size == 0:
        return None
    return float(values.min()), float(values.max())


def _display_pipeline(arr: np.ndarray, ds: Any) -> tuple[np.ndarray, bool, str]:
    """Modality LUT → VOI LUT → MONOCHROME1 inversion; returns (pixels, inverted, voi_applied)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo: float = float(-(2 ** (bits - 1))) if signed else 0.0
    hi: float = float(2 ** (bits - 1) - 1) if signed else float(2**bits - 1)

    out = apply_modality_lut(arr, ds)
    mlut = ds.get("ModalityLUTSequence")
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if mlut:
        lo, hi = _lut_data_range(mlut[0]) or (0.0, float(2 ** int(mlut[0].LUTDescriptor[2]) - 1))
    elif slope is not None and intercept is not None:
        a, b = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
        lo, hi = min(a, b), max(a, b)

    voi = "none"
    vlut = ds.get("VOILUTSequence")
    has_vlut = bool(vlut) and vlut[0].get("LUTDescriptor") is not None and vlut[0].get("LUTData") is not None
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_vlut or has_window:
        out = apply_voi_lut(out, ds, index=0, prefer_lut=True)
        if has_vlut:
            voi = "lut"
            lo, hi = _lut_data_range(vlut[0]) or (0.0, float(2 ** int(vlut[0].LUTDescriptor[2]) - 1))
        else:
            voi = "window"
            # pydicom's windowing output range (PS3.3 C.11.2.1.2) in the modality-LUT output units.
            if mlut:
                wlo, whi = 0.0, float(2 ** int(mlut[0].LUTDescriptor[2]) - 1)
            elif signed:
                wlo, whi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
            else:
                wlo, whi = 0.0, float(2**bits - 1)
            if slope is not None and intercept is not None:
                wlo, whi = wlo * float(slope) + float(intercept), whi * float(slope) + float(intercept)
            lo, hi = wlo, whi

    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if inverted:
        if np.issubdtype(out.dtype, np.integer) and lo >= 0 and hi <= np.iinfo(out.dtype).max:
            out = (np.asarray(lo + hi, dtype=np.float64) - out).astype(out.dtype)
        else:
            out = (lo + hi) - out.astype(np.float64)
    return out, inverted, voi


def _dicom_to_native(arr: np.ndarray) -> np.ndarray:
    """Integral results within 0..255 / 0..65535 keep an unsigned dtype; the rest become float32."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return arr
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        return arr.astype(np.float32)
    if arr.size and (np.issubdtype(arr.dtype, np.integer) or np.array_equal(arr, np.round(arr))):
        amin, amax = arr.min(), arr.max()
        if amin >= 0 and amax <= 255 and arr.dtype.itemsize == 1:
            return arr.astype(np.uint8)
        if amin >= 0 and amax <= 65535:
            return arr.astype(np.uint16)
    return arr.astype(np.float32)


def _open_dicom(path: Path, force: bool) -> Any:
    import pydicom

    try:
        return pydicom.dcmread(path, force=force)
    except Exception as exc:  # corrupt bytes raise BytesLengthException, struct.error, ... (fuzz/)
        raise _fail(path, f"corrupt or unreadable DICOM data ({type(exc).__name__}: {exc})") from exc


def _check_pixel_data(ds: Any, path: str) -> Any:
    """Frame count and compressed-stream checks (dicom_codestream) before any decoder runs."""
    from .dicom_codestream import check_pixel_data

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise _fail(path, "DICOM dataset has no pixel data (no PixelData element)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise _fail(path, f"DICOM image has zero size (Rows={rows}, Columns={cols})")
    try:
        return check_pixel_data(ds)
    except ImageReadError as exc:
        raise _fail(path, str(exc)) from exc


def _decode_frames(ds: Any, path: str, index: int | None) -> np.ndarray:
    """Decoded stored values; frames first (F, H, W[, C]) when several, or one frame when index given."""
    from .dicom_codecs import install_decoders

    install_decoders()
    try:
        if index is None:
            arr = ds.pixel_array
        else:
            from pydicom.pixels import pixel_array

            arr = pixel_array(ds, index=index)
    except Exception as exc:  # decoders raise RuntimeError, ValueError, NotImplementedError, ...
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", str(ts))
        raise _fail(
            path,
            f"cannot decode DICOM pixel data (transfer syntax {ts_name}): {type(exc).__name__}: "
            + str(exc).replace("\n", " ").strip(),
        ) from exc
    return np.asarray(arr)


# Attributes the display pipeline reads; a frame's view of the data set holds only these.
_PIPELINE_KEYS = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _stream_bits_needed(ds: Any, arr: np.ndarray, stream_precision: int | None) -> int | None:
    """The compressed stream's precision when the decoded values do not fit Bits Stored.

    Encoders often write a wider stream than Bits Stored (dcmcjpeg's lossless JPEG of 10-bit
    data is a 16-bit stream), which is harmless while the values fit. A 16-bit JPEG 2000 in an
    object that says 12 bits is not: inversion and windowing over the 12-bit range would wrap
    or clip real values, so such frames are read at the stream's precision.
    """
    bits = int(ds.get("BitsStored", 0) or 0)
    if stream_precision is None or stream_precision <= bits or not np.issubdtype(arr.dtype, np.integer):
        return None
    if arr.size == 0:
        return None
    lo, hi = int(arr.min()), int(arr.max())
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        fits = -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1
    else:
        fits = hi <= 2**bits - 1
    return None if fits else stream_precision


def _frame_view(ds: Any, index: int, stream_bits: int | None) -> Any:
    """The data set as the display pipeline should see frame ``index``.

    Enhanced objects keep rescale and window per frame (functional groups); a compressed stream
    whose sample precision exceeds Bits Stored (a 16-bit JPEG 2000 in a "12-bit" object) is
    read at the stream's precision, or inversion and windowing would treat real values as
    overflow. Without either, the data set itself.
    """
    from .dicom_functional_groups import frame_pixel_attributes, has_functional_groups

    overrides = frame_pixel_attributes(ds, index) if has_functional_groups(ds) else {}
    bits_stored = int(ds.get("BitsStored", 0) or 0)
    widen = stream_bits is not None and stream_bits > bits_stored
    if not overrides and not widen:
        return ds
    import pydicom

    view = pydicom.Dataset()
    for kw in _PIPELINE_KEYS:
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    for kw, value in overrides.items():
        setattr(view, kw, value)
    if widen:
        view.BitsStored, view.HighBit = stream_bits, stream_bits - 1  # type: ignore[operator]
    return view


def _applied_window(ds: Any, voi: str) -> dict[str, float]:
    """The window centre and width applied to a frame (published, so a viewer can match it)."""
    if voi != "window":
        return {}
    try:
        c, w = ds.WindowCenter, ds.WindowWidth
        c = c[0] if hasattr(c, "__len__") and not isinstance(c, str) else c
        w = w[0] if hasattr(w, "__len__") and not isinstance(w, str) else w
        return {"WindowCenter": float(c), "WindowWidth": float(w)}
    except (AttributeError, TypeError, ValueError, IndexError):
        return {}


def _dicom_frame_image(frame: np.ndarray, ds: Any, meta: dict[str, Any], path: str) -> XrayImage:
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if spp > 1 or frame.ndim == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            frame = convert_color_space(frame, photometric, "RGB")
        pixels = _to_gray(frame, path)
        inverted, voi = False, "none"
    else:
        out, inverted, voi = _display_pipeline(frame, ds)
        pixels = _dicom_to_native(out)
    pixels = _check_size(np.ascontiguousarray(pixels), path)
    meta = dict(meta)
    meta.update(inverted=inverted, voi=voi, **_applied_window(ds, voi))
    return XrayImage(pixels=pixels, meta=meta)


def read_dicom_frames(ds_or_path: Any) -> list[XrayImage]:
    """Every frame of a DICOM image through the display pipeline (one ``XrayImage`` per frame).

    Accepts a path or an already-read ``pydicom.Dataset`` (a node that received it over DICOM
    networking should not have to write it to disk first). Enhanced objects: each frame gets
    its own rescale, window, pixel spacing, positioner angles, source distances and acquisition
    times from the functional groups (shared, then per-frame). Multi-frame objects: each frame's
    ``frame_interval_ms`` (time to the next frame) comes from Frame Time Vector, Frame Time or
    the frames' acquisition times. The pixel data is checked first (frame count, each
    compressed stream's markers and size: ``dicom_codestream``).
    """
    import pydicom

    from .dicom_functional_groups import frame_intervals_ms, frame_meta, has_functional_groups

    if isinstance(ds_or_path, pydicom.Dataset):
        ds = ds_or_path
        path = str(getattr(ds, "filename", None) or _NO_FILE)
    else:
        p = _existing(ds_or_path)
        ds = _open_dicom(p, force=True)
        path = str(p)
    check = _check_pixel_data(ds, path)
    arr = _decode_frames(ds, path, None)
    n_frames = check.n_frames
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = arr if n_frames > 1 else arr[None]
    if (spp == 1 and frames.ndim != 3) or (spp > 1 and frames.ndim != 4) or len(frames) != n_frames:
        raise _fail(path, f"unexpected decoded pixel array shape {arr.shape} for {n_frames} frames")
    meta = _dicom_meta(ds, path)
    meta["num_frames"] = n_frames
    stream_bits = _stream_bits_needed(ds, arr, check.precision)
    if stream_bits is not None:
        meta["stream_bits"] = stream_bits  # read at the stream's precision, not Bits Stored
    enhanced = has_functional_groups(ds)
    metas = [{**meta, **frame_meta(ds, i)} if enhanced else dict(meta) for i in range(n_frames)]
    intervals = frame_intervals_ms(ds, metas)
    images = []
    for i, frame in enumerate(frames):
        img = _dicom_frame_image(frame, _frame_view(ds, i, stream_bits), metas[i], path)
        img.meta["frame_index"] = i
        if intervals[i] is not None:
            img.meta["frame_interval_ms"] = intervals[i]
        images.append(img)
    return images


def _read_dicom_first(path: Path, force: bool) -> XrayImage:
    from .dicom_functional_groups import frame_meta, has_functional_groups

    ds = _open_dicom(path, force=force)
    check = _check_pixel_data(ds, str(path))
    n_frames = check.n_frames
    frame = _decode_frames(ds, str(path), 0 if n_frames > 1 else None)
    expected = 3 if int(ds.get("SamplesPerPixel", 1) or 1) > 1 else 2
    if frame.ndim != expected:
        raise _fail(path, f"unexpected decoded pixel array shape {frame.shape}")
    meta = _dicom_meta(ds, str(path))
    meta["num_frames"] = n_frames
    meta["frame_index"] = 0
    if has_functional_groups(ds):
        meta.update(frame_meta(ds, 0))
    stream_bits = _stream_bits_needed(ds, frame, check.precision)
    if stream_bits is not None:
        meta["stream_bits"] = stream_bits
    return _dicom_frame_image(frame, _frame_view(ds, 0, stream_bits), meta, str(path))


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise _fail(p, "file does not exist")
    if not p.is_file():
        raise _fail(p, "not a regular file")
    if p.stat().st_size == 0:
        raise _fail(p, "file is empty (0 bytes)")
    return p


def read_image(path: str | os.PathLike[str]) -> XrayImage:
    """Decode PNG, JPEG, TIFF, BMP or DICOM into one 2-D gray frame (DICOM multi-frame: frame 0).

    The returned pixels follow the X-ray display convention (bright = dense); see the module
    docstring for dtype rules and the DICOM LUT pipeline. Raises :class:`ImageReadError` naming
    the file for a missing, empty, corrupt or unrecognised file, DICOM without pixel data, or a
    zero-size image.
    """
    p = _existing(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise _fail(p, f"cannot open file ({exc})") from exc
    kind = _sniff(head)
    ext = p.suffix.lower()
    if kind is None:
        if ext in _DICOM_EXTS:
            kind = "dicom-raw"
        elif ext in _RASTER_EXTS or ext in _TIFF_EXTS:
            raise _fail(p, f"content does not match the {ext} extension (corrupt or truncated file)")
        else:
            raise _fail(
                p,
                f"unknown image format (extension {ext or '<none>'!r} and no PNG/JPEG/TIFF/BMP/DICOM "
                "signature in the file header)",
            )
    if kind == "dicom":
        return _read_dicom_first(p, force=False)
    if kind == "dicom-raw":
        return _read_dicom_first(p, force=True)
    if kind == "tiff":
        return _read_tiff(p)
    return _read_raster(p, kind)
