"""Image reading: real DICOM/PNG files from ../shared plus files written into tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_windowing
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fluorosam_rt.imageio import ImageReadError, XrayImage, read_dicom_frames, read_image


@pytest.fixture(scope="module")
def dicom_dir(shared_dir: Path) -> Path:
    d = shared_dir / "data" / "dicom"
    if not d.is_dir():
        pytest.fail(f"missing shared DICOM folder {d}", pytrace=False)
    return d


@pytest.fixture(scope="module")
def chest_images(shared_dir: Path) -> list[Path]:
    files = sorted((shared_dir / "data" / "chest-xray-hannover" / "images").glob("*.png"))
    if len(files) < 3:
        pytest.fail("missing shared chest-xray-hannover images", pytrace=False)
    return files


def _make_dicom(
    path: Path,
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    **extra: object,
) -> Dataset:
    """A minimal uncompressed single- or multi-frame DICOM file, written with preamble."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PHANTOM-1"
    ds.Modality = "XA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


# --------------------------------------------------------------------------- real files


def test_real_dicoms_decode_with_display_pipeline(dicom_dir: Path) -> None:
    expected = {
        "RG1_J2KI.dcm": ((1955, 1841), "CR"),
        "RG3_J2KI.dcm": ((1760, 1760), "CR"),
        "RG3_J2KR.dcm": ((1760, 1760), "CR"),
        "dx_image.dcm": ((169, 211), "DX"),
    }
    for name, (shape, modality) in expected.items():
        img = read_image(dicom_dir / name)
        assert isinstance(img, XrayImage)
        assert img.pixels.shape == shape, name
        assert img.pixels.ndim == 2
        assert img.pixels.dtype in (np.uint8, np.uint16, np.float32)
        assert np.isfinite(img.pixels).all()
        assert img.meta["Modality"] == modality
        assert img.meta["PhotometricInterpretation"] == "MONOCHROME1"
        assert img.meta["inverted"] is True
        assert img.meta["source_path"] == str(dicom_dir / name)
        assert img.meta["SOPInstanceUID"]
        assert img.pixels.max() > img.pixels.min()


def test_real_dicom_window_then_monochrome1_inversion(dicom_dir: Path) -> None:
    # Independent recomputation: pydicom's windowing into [0, 2^BitsStored - 1], then flip.
    ds = pydicom.dcmread(dicom_dir / "RG3_J2KR.dcm")
    windowed = apply_windowing(ds.pixel_array, ds)
    expected = (2**ds.BitsStored - 1) - windowed
    got = read_image(dicom_dir / "RG3_J2KR.dcm").pixels
    np.testing.assert_allclose(got, expected, atol=1e-3)

    ds = pydicom.dcmread(dicom_dir / "dx_image.dcm")
    windowed = apply_windowing(ds.pixel_array.astype(np.float64) * 1.0 + 0.0, ds)
    got = read_image(dicom_dir / "dx_image.dcm")
    np.testing.assert_allclose(got.pixels, 255.0 - windowed, atol=1e-3)
    assert got.meta["voi"] == "window"
    assert got.meta["ImagerPixelSpacing"] == pytest.approx((1.2, 1.2012), abs=1e-6)
    assert got.meta["DistanceSourceToDetector"] == pytest.approx(1000.0)
    assert got.meta["PatientID"] == "123456"


def test_jpeg2000_lossy_matches_lossless(dicom_dir: Path) -> None:
    lossy = read_image(dicom_dir / "RG3_J2KI.dcm").pixels.astype(np.float64)
    lossless = read_image(dicom_dir / "RG3_J2KR.dcm").pixels.astype(np.float64)
    assert np.abs(lossy - lossless).mean() < 5.0  # 10-bit data, window width 1024
    assert np.corrcoef(lossy.ravel(), lossless.ravel())[0, 1] > 0.99


def test_invalid_zero_pixel_spacing_becomes_none(dicom_dir: Path) -> None:
    meta = read_image(dicom_dir / "RG1_J2KI.dcm").meta
    assert "PixelSpacing" in meta
    assert meta["PixelSpacing"] is None


def test_chest_pngs_are_native_uint8(chest_images: list[Path]) -> None:
    for path in chest_images[:3]:
        img = read_image(path)
        ref = np.asarray(Image.open(path))
        assert img.pixels.dtype == np.uint8
        np.testing.assert_array_equal(img.pixels, ref)
        assert img.meta["format"] == "png"


def test_dicom_sniffed_despite_unknown_extension(dicom_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "mystery.bin"
    shutil.copyfile(dicom_dir / "dx_image.dcm", target)
    a = read_image(target)
    b = read_image(dicom_dir / "dx_image.dcm")
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.meta["format"] == "dicom"


# --------------------------------------------------------------------------- written files


def test_png_16bit_roundtrip(tmp_path: Path) -> None:
    arr = (np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) * 53 % 65536).astype(np.uint16)
    arr[0, 0], arr[-1, -1] = 0, 65535
    path = tmp_path / "img16.png"
    assert cv2.imwrite(str(path), arr)
    img = read_image(path)
    assert img.pixels.dtype == np.uint16
    np.testing.assert_array_equal(img.pixels, arr)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_tiff_roundtrip(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(3)
    arr = (rng.random((17, 23)) * 200).astype(dtype)
    path = tmp_path / "img.tiff"
    tifffile.imwrite(path, arr)
    img = read_image(path)
    assert img.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(img.pixels, arr)
    assert img.meta["format"] == "tiff"


def test_rgb_png_weighted_gray_and_alpha_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (12, 9, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    for name in ("rgb.png", "rgba.png"):
        img = read_image(tmp_path / name)
        assert img.pixels.dtype == np.float32
        np.testing.assert_allclose(img.pixels, expected, atol=1e-4)


def test_rgb_jpeg_matches_pil_convert_f(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:48]
    rgb = np.stack([xx * 5, yy * 3, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)
    path = tmp_path / "colour.jpg"
    Image.fromarray(rgb, "RGB").save(path, quality=95)
    img = read_image(path)
    ref = np.asarray(Image.open(path).convert("F"))  # what the official CLI loads
    assert img.pixels.shape == (64, 48)
    assert img.pixels.dtype == np.float32
    np.testing.assert_allclose(img.pixels, ref, atol=1e-3)
    assert img.meta["format"] == "jpeg"


def test_gray_stored_as_rgb_keeps_native_dtype(tmp_path: Path) -> None:
    gray = np.arange(20 * 10, dtype=np.uint8).reshape(20, 10)
    Image.fromarray(np.stack([gray] * 3, -1), "RGB").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, gray)


def test_constructed_monochrome1_is_inverted(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 4096, (16, 20), dtype=np.uint16)
    _make_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", 12)
    _make_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", 12)
    m1 = read_image(tmp_path / "m1.dcm")
    m2 = read_image(tmp_path / "m2.dcm")
    np.testing.assert_array_equal(m2.pixels, raw)
    assert m1.pixels.dtype == np.uint16
    np.testing.assert_array_equal(m1.pixels, 4095 - raw)
    assert m1.meta["inverted"] is True
    assert m2.meta["inverted"] is False
    assert m1.meta["PatientID"] == "PHANTOM-1"
    assert m1.meta["Modality"] == "XA"


def test_constructed_voi_lut_sequence_then_inversion(tmp_path: Path) -> None:
    raw = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint16)
    lut_values = [10, 20, 200, 250]
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 8])  # LUTDescriptor: 4 entries, first maps 0, 8 bits
    item.add_new(0x00283006, "US", lut_values)  # LUTData
    ds = _make_dicom(tmp_path / "lut.dcm", raw, "MONOCHROME1", 2)
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 1, 2  # present too: the LUT must win
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    img = read_image(tmp_path / "lut.dcm")
    mapped = np.take(np.array(lut_values), raw)
    np.testing.assert_array_equal(img.pixels, (10 + 250) - mapped)  # inverted within the LUT range
    assert img.meta["voi"] == "lut"


def test_constructed_rescale_modality_lut(tmp_path: Path) -> None:
    raw = np.array([[0, 100], [200, 4095]], dtype=np.uint16)
    _make_dicom(tmp_path / "r.dcm", raw, "MONOCHROME2", 12, RescaleSlope=0.5, RescaleIntercept=-10)
    img = read_image(tmp_path / "r.dcm")
    np.testing.assert_allclose(img.pixels, raw * 0.5 - 10)
    assert img.pixels.dtype == np.float32


def test_multiframe_dicom(tmp_path: Path) -> None:
    frames = np.stack([np.full((6, 7), 100 * (i + 1), np.uint16) for i in range(3)])
    frames[:, 0, 0] = 7
    ds = _make_dicom(tmp_path / "mf.dcm", frames, "MONOCHROME2", 16)
    all_frames = read_dicom_frames(tmp_path / "mf.dcm")
    assert len(all_frames) == 3
    for i, img in enumerate(all_frames):
        np.testing.assert_array_equal(img.pixels, frames[i])
        assert img.meta["frame_index"] == i
        assert img.meta["num_frames"] == 3
    first = read_image(tmp_path / "mf.dcm")
    np.testing.assert_array_equal(first.pixels, frames[0])
    assert first.meta["num_frames"] == 3
    # A Dataset is accepted as well (as received over the network).
    from_ds = read_dicom_frames(pydicom.dcmread(tmp_path / "mf.dcm"))
    np.testing.assert_array_equal(from_ds[2].pixels, frames[2])
    assert ds.NumberOfFrames == 3


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageReadError, match=r"nope\.png.*does not exist"):
        read_image(path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.dcm.*empty"):
        read_image(path)


def test_corrupt_png(tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    with pytest.raises(ImageReadError, match=r"bad\.png.*corrupt"):
        read_image(path)


def test_corrupt_dicom(tmp_path: Path, dicom_dir: Path) -> None:
    data = (dicom_dir / "dx_image.dcm").read_bytes()
    path = tmp_path / "trunc.dcm"
    path.write_bytes(data[:2000])  # header cut off mid-way, pixel data missing
    with pytest.raises(ImageReadError, match=r"trunc\.dcm"):
        read_image(path)


def test_garbage_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "text.jpg"
    path.write_text("this is not an image at all")
    with pytest.raises(ImageReadError, match=r"text\.jpg.*does not match"):
        read_image(path)


def test_unknown_extension_without_signature(tmp_path: Path) -> None:
    path = tmp_path / "data.xyz"
    path.write_bytes(b"\x01\x02\x03" * 100)
    with pytest.raises(ImageReadError, match=r"data\.xyz.*unknown image format"):
        read_image(path)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    _make_dicom(tmp_path / "nopix.dcm", np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(tmp_path / "nopix.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"nopix\.dcm.*no pixel data"):
        read_image(tmp_path / "nopix.dcm")


def test_zero_size_dicom(tmp_path: Path) -> None:
    _make_dicom(tmp_path / "zero.dcm", np.zeros((2, 2), np.uint16))
    ds = pydicom.dcmread(tmp_path / "zero.dcm")
    ds.Rows = 0
    ds.PixelData = b""
    ds.save_as(tmp_path / "zero.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"zero\.dcm.*zero size"):
        read_image(tmp_path / "zero.dcm")


def test_error_is_a_value_error() -> None:
    assert issubclass(ImageReadError, ValueError)
