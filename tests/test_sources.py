"""Sources on real inputs: video files through OpenCV, replay folders, and a DICOM Storage SCP fed
by dcmtk's storescu and by pynetdicom, with the standard's status codes on failure."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fluorosam_rt.imageio import read_dicom_frames
from fluorosam_rt.sources.base import Frame
from fluorosam_rt.sources.dicom_scp import DicomStorageSource
from fluorosam_rt.sources.replay import ReplaySource
from fluorosam_rt.sources.video import VideoSource, detect_circular_fov

XA = "1.2.840.10008.5.1.4.1.1.12.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


class Collector:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lock = threading.Lock()

    def __call__(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)

    def wait(self, n: int, timeout: float = 20.0) -> list[Frame]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.frames) >= n:
                    return list(self.frames)
            time.sleep(0.02)
        raise AssertionError(f"only {len(self.frames)} of {n} frames arrived within {timeout} s")


def write_video(
    path: Path, n: int = 12, size: tuple[int, int] = (96, 128), fps: float = 30.0
) -> list[np.ndarray]:
    """An MJPG AVI of a bright disc (a C-arm's round field of view) moving on black."""
    h, w = size
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    frames = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        cv2.circle(img, (w // 2 + i, h // 2), min(h, w) // 3, (200, 200, 200), -1)
        vw.write(img)
        frames.append(img[:, :, 0])
    vw.release()
    return frames


def multiframe_xa(path: Path, n_frames: int = 4, rows: int = 48, cols: int = 64) -> pydicom.Dataset:
    """An uncompressed multi-frame XA cine with geometry, as a C-arm sends it."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, (n_frames, rows, cols), dtype=np.uint16)
    for i in range(n_frames):
        pixels[i, :, : 8 * (i + 1)] = 4000  # frames differ visibly
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = XA, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "TEST123", "XA"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.FrameTime = 50
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 1200, 800
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = 30, -5
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


# --------------------------------------------------------------------------- video and replay


def test_video_file_source_yields_gray_frames_in_order(tmp_path):
    expected = write_video(tmp_path / "clip.avi")
    src, sink = VideoSource(str(tmp_path / "clip.avi"), realtime=False), Collector()
    src.start(sink)
    try:
        frames = sink.wait(len(expected))
        assert src.finished.wait(5)
    finally:
        src.stop()
    assert [f.frame_id for f in frames] == list(range(len(expected)))
    assert all(f.pixels.ndim == 2 and f.pixels.shape == (96, 128) for f in frames)
    assert np.abs(frames[3].pixels.astype(int) - expected[3]).mean() < 8  # MJPG is lossy
    assert src.describe()["state"] == "finished"


def test_video_roi_auto_crops_to_the_circular_field(tmp_path):
    write_video(tmp_path / "clip.avi", n=3)
    src, sink = VideoSource(str(tmp_path / "clip.avi"), roi="auto", realtime=False), Collector()
    src.start(sink)
    try:
        frames = sink.wait(3)
    finally:
        src.stop()
    h, w = frames[0].pixels.shape
    assert 60 <= h <= 70
    assert 60 <= w <= 70
    assert detect_circular_fov(np.zeros((50, 50), np.uint8)) is None


def test_video_device_that_is_missing_reports_reconnecting():
    src, sink = VideoSource("/nonexistent/device.avi", reconnect_initial_s=0.05), Collector()
    src.start(sink)
    try:
        deadline = time.monotonic() + 5
        while src.describe()["reconnects"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.describe()["state"] == "reconnecting"
        assert src.describe()["reconnects"] >= 2
    finally:
        src.stop()
    assert not sink.frames


def test_replay_folder_paces_and_loops(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((20, 30), 50 * i, np.uint8))
    src, sink = ReplaySource(tmp_path, fps=50, loop=True), Collector()
    t0 = time.monotonic()
    src.start(sink)
    try:
        frames = sink.wait(7)
    finally:
        src.stop()
    assert time.monotonic() - t0 >= 6 / 50 * 0.9  # paced, not as fast as possible
    assert [int(f.pixels[0, 0]) for f in frames[:7]] == [0, 50, 100, 0, 50, 100, 0]
    assert [f.frame_id for f in frames] == list(range(len(frames)))  # ids keep rising across loops


def test_replay_of_a_multiframe_dicom_uses_its_frame_time(tmp_path):
    multiframe_xa(tmp_path / "cine.dcm", n_frames=3)
    src = ReplaySource(tmp_path / "cine.dcm")
    assert src.fps == pytest.approx(20.0)  # FrameTime 50 ms
    assert len(src.frames) == 3


# --------------------------------------------------------------------------- DICOM SCP


@pytest.fixture
def scp():
    src, sink = DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST"), Collector()
    src.start(sink)
    try:
        yield src, sink
    finally:
        src.stop()


def storescu(port: int, *files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    exe = shutil.which("storescu")
    if exe is None:
        pytest.fail(
            "dcmtk's storescu is not installed (apt-get install dcmtk; .ci/run installs it)", pytrace=False
        )
    cmd = [exe, *extra, "-aec", "FSAMTEST", "-aet", "CARM1", "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_storescu_single_frame_and_jpeg2000_arrive_with_display_pipeline(scp, shared_dir):
    src, sink = scp
    dx = shared_dir / "data" / "dicom" / "dx_image.dcm"
    j2k = shared_dir / "data" / "dicom" / "RG3_J2KR.dcm"
    assert storescu(src.address[1], dx).returncode == 0
    proc = storescu(src.address[1], j2k, extra=("-xv",))
    assert proc.returncode == 0, proc.stderr
    frames = sink.wait(2)
    np.testing.assert_array_equal(frames[0].pixels, read_dicom_frames(dx)[0].pixels)
    np.testing.assert_array_equal(frames[1].pixels, read_dicom_frames(j2k)[0].pixels)
    ref = pydicom.dcmread(dx)
    assert frames[0].meta["SOPInstanceUID"] == ref.SOPInstanceUID
    assert frames[0].meta["StudyInstanceUID"] == ref.StudyInstanceUID
    assert frames[0].meta["inverted"] is True  # MONOCHROME1
    assert frames[0].meta["calling_ae"] == "CARM1"
    assert src.describe()["status_counts"] == {"0x0000": 2}


def test_storescu_multiframe_becomes_paced_frames_with_geometry(scp, tmp_path):
    src, sink = scp
    multiframe_xa(tmp_path / "cine.dcm", n_frames=4)
    t0 = time.monotonic()
    assert storescu(src.address[1], tmp_path / "cine.dcm").returncode == 0
    frames = sink.wait(4)
    assert time.monotonic() - t0 >= 3 * 0.05 * 0.9  # played at FrameTime, not in one burst
    ref = read_dicom_frames(tmp_path / "cine.dcm")
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.pixels, ref[i].pixels)
        assert f.meta["frame_index"] == i
    m = frames[0].meta
    assert m["ImagerPixelSpacing"] == (0.3, 0.3)
    assert (m["DistanceSourceToDetector"], m["DistanceSourceToPatient"]) == (1200.0, 800.0)
    assert (m["PositionerPrimaryAngle"], m["PositionerSecondaryAngle"]) == (30.0, -5.0)
    assert m["FrameTime"] == 50.0


def _pynetdicom_store(port: int, ds: pydicom.Dataset, contexts: list[str], calling: str = "SCU") -> tuple:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    for uid in contexts:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="FSAMTEST")
    if not assoc.is_established:
        return None, assoc
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        status = assoc.send_c_store(ds) if ds.SOPClassUID in accepted else None
        return status, accepted
    finally:
        assoc.release()


def test_pynetdicom_store_without_pixel_data_gets_cannot_understand(scp, tmp_path):
    src, sink = scp
    ds = multiframe_xa(tmp_path / "cine.dcm", n_frames=2)
    del ds.PixelData
    status, _ = _pynetdicom_store(src.address[1], ds, [XA])
    assert 0xC000 <= status.Status <= 0xCFFF
    assert "ErrorComment" in status
    good = multiframe_xa(tmp_path / "ok.dcm", n_frames=2)
    status, _ = _pynetdicom_store(src.address[1], good, [XA])
    assert status.Status == 0x0000
    assert len(sink.wait(2)) == 2  # the node kept going after the bad object
    assert src.rejected["cannot_understand"] == 1


def test_oversized_frames_get_out_of_resources(tmp_path):
    src, sink = (
        DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", max_frame_pixels=1000),
        Collector(),
    )
    src.start(sink)
    try:
        status, _ = _pynetdicom_store(src.address[1], multiframe_xa(tmp_path / "big.dcm", 1), [XA])
    finally:
        src.stop()
    assert status.Status == 0xA700
    assert not sink.frames


def test_unsupported_sop_class_is_refused_at_association(scp, tmp_path):
    src, _ = scp
    ds = multiframe_xa(tmp_path / "ct.dcm", n_frames=1)
    ds.SOPClassUID = CT
    status, accepted = _pynetdicom_store(src.address[1], ds, [CT, XA])
    assert status is None
    assert CT not in accepted
    assert XA in accepted


def test_calling_ae_allow_list_rejects_unknown_senders(tmp_path):
    src = DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", allowed_calling_aes=["CARM1"])
    sink = Collector()
    src.start(sink)
    try:
        ds = multiframe_xa(tmp_path / "a.dcm", n_frames=1)
        status, assoc = _pynetdicom_store(src.address[1], ds, [XA], calling="INTRUDER")
        assert status is None
        assert assoc.is_rejected
        status, _ = _pynetdicom_store(src.address[1], ds, [XA], calling="CARM1")
        assert status.Status == 0x0000
    finally:
        src.stop()
