"""The bridge end to end on a real node: node -> OpenIGTLink relay -> pyigtl client, node -> DICOM
SEG (frames sent with dcmtk's storescu), node -> C subscriber on libzmq, node -> recorder -> replay.

Every node, relay and subscriber is stopped in a ``finally`` (running_node does it for the node).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from bridge import Subscriber, SubscriberTimeout
from bridge.geometry import ijk_to_ras

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node, wait_for
from test_sources import multiframe_xa, storescu

REPO = Path(__file__).resolve().parents[1]
C_SOURCE = REPO / "bridge" / "c" / "fsam_sub.c"


def _drain(sub: Subscriber, idle: float = 1.0) -> list:
    out = []
    while True:
        try:
            out.append(sub.receive(timeout=idle, newest=False))
        except SubscriberTimeout:
            return out


# --------------------------------------------------------------------------- OpenIGTLink


def test_node_to_igtl_relay_to_pyigtl_client(tmp_path, bundle):
    pyigtl = pytest.importorskip("pyigtl")
    from bridge.igtl_relay import IgtlRelay, device_name

    cine = tmp_path / "rec" / "cine.dcm"
    cine.parent.mkdir()
    multiframe_xa(cine, n_frames=4)  # ImagerPixelSpacing 0.3, DSD 1200, DSP 800
    source = {"kind": "replay", "path": str(cine.parent), "fps": 8, "loop": True}
    relay = IgtlRelay(port=0)
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", relay.port)
    stop = threading.Event()
    try:
        wait_for(relay.server.is_connected, 10, "the pyigtl client to connect")
        with running_node(tmp_path, bundle, source, prompts=("left lung", "heart"), downsample=2) as (
            _app,
            sub,
        ):
            relay_sub = Subscriber(f"ipc://{tmp_path}/masks", topic="carm0")
            worker = threading.Thread(target=relay.run, args=(relay_sub,), kwargs={"stop": stop}, daemon=True)
            worker.start()
            try:
                wanted = sub.receive(timeout=30, newest=False)  # the ground truth, same stream
                seen = {wanted.timestamps_ns["source"]: wanted}
                got = None
                deadline = time.monotonic() + 20
                while got is None and time.monotonic() < deadline:
                    img = client.wait_for_message(device_name("left lung"), timeout=5)
                    for m in _drain(sub, idle=0.05):
                        seen[m.timestamps_ns["source"]] = m
                    if img is not None:
                        key = min(seen, key=lambda t: abs(t / 1e9 - img.timestamp))
                        if abs(key / 1e9 - img.timestamp) < 1e-5:
                            got, truth = img, seen[key]
                status = client.wait_for_message("FluoroSAM_status", timeout=5)
            finally:
                stop.set()
                worker.join(5)
                relay_sub.close()
    finally:
        client.stop()
        relay.close()
    assert got is not None, "no IMAGE message matched a published frame by source timestamp"
    assert got.device_name == "FluoroSAM_left_lung"
    label = relay.labels["left lung"]
    # Per prompt: the shared checkpoint gives each prompt its own mask (tests/conftest.py), so a
    # relay that sent another prompt's mask under this device name fails the comparison below.
    assert [p.text for p in truth.prompts] == ["left lung", "heart"]
    assert not np.array_equal(truth.prompts[0].mask, truth.prompts[1].mask)
    mask = truth.prompts[0].mask
    assert got.image.shape == (1, *mask.shape)
    np.testing.assert_array_equal(got.image[0], mask * label)
    assert got.world_coordinate_system == "ras"
    # 0.3 mm at the detector, magnification 1200/800 -> 0.2 mm at the isocentre, x2 downsampling
    expected, size = ijk_to_ras(truth.geometry, truth.source_shape, 2)
    assert size.basis == "ImagerPixelSpacing@isocenter"
    np.testing.assert_allclose(np.linalg.norm(got.ijk_to_world_matrix[:3, 0]), 0.4, rtol=1e-5)
    np.testing.assert_allclose(got.ijk_to_world_matrix, expected, atol=1e-4)
    assert status is not None
    assert '"frame_id"' in status.string


# --------------------------------------------------------------------------- DICOM SEG


def test_storescu_to_node_to_dicom_seg(tmp_path, bundle, shared_dir):
    hd = pytest.importorskip("highdicom")
    from bridge.seg_archive import SegArchive, full_resolution, run_archive

    dx = shared_dir / "data" / "dicom" / "dx_image.dcm"
    cine = tmp_path / "cine.dcm"
    multiframe_xa(cine, n_frames=2)
    source = {"kind": "dicom", "host": "127.0.0.1", "port": 0, "ae_title": "FSAMTEST"}
    prompts = ("left lung", "heart", "guidewire tip")
    archive = SegArchive(tmp_path / "seg")
    with running_node(tmp_path, bundle, source, prompts=prompts, downsample=2, mask_encoding="bits") as (
        app,
        sub,
    ):
        seg_sub = Subscriber(f"ipc://{tmp_path}/masks", topic="carm0", rcvhwm=1000)
        try:
            time.sleep(0.2)
            port = app.node.source.address[1]
            assert storescu(port, dx).returncode == 0
            assert storescu(port, cine).returncode == 0
            wait_for(lambda: app.node.accounting.snapshot()["published"] == 3, 30, "3 published frames")
            published = _drain(sub)
            run_archive(seg_sub, archive, max_messages=3, idle_timeout=5)
        finally:
            seg_sub.close()
    assert archive.written == 3, archive.skipped
    assert len(published) == 3
    by_sop = {(m.source["SOPInstanceUID"], m.source.get("frame_index", 0)): m for m in published}
    ref_dx = pydicom.dcmread(dx, stop_before_pixels=True)
    files = sorted((tmp_path / "seg").glob("*.dcm"))
    found_cine_frames = set()
    for f in files:
        seg = hd.seg.segread(f)
        ds = pydicom.dcmread(f)
        ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        frame_index = int(ref.get("ReferencedFrameNumber", 1)) - 1
        msg = by_sop[(ref.ReferencedSOPInstanceUID, frame_index)]
        assert ds.StudyInstanceUID == msg.source["StudyInstanceUID"]
        assert ds.PatientID == msg.source["PatientID"]
        assert ds.Modality == "SEG"
        assert (ds.Rows, ds.Columns) == msg.source_shape
        assert [s.SegmentLabel for s in ds.SegmentSequence] == list(prompts)
        lung = ds.SegmentSequence[0]
        assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
        assert lung.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
        assert ds.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"
        generic = ds.SegmentSequence[2]  # no code for a guidewire tip: generic code + prompt text
        assert generic.SegmentedPropertyTypeCodeSequence[0].CodeValue == "91723000"
        assert "guidewire tip" in generic.SegmentDescription
        alg = lung.SegmentationAlgorithmIdentificationSequence[0]
        assert alg.AlgorithmName == "fluorosam-rt"
        assert alg.AlgorithmVersion == bundle.name
        assert ds.ManufacturerModelName == bundle.name[:64]
        # pixels: each segment equals the published mask brought back to source resolution
        pixels = ds.pixel_array.reshape(-1, *msg.source_shape)
        assert [p.text for p in msg.prompts] == list(prompts)  # segment i is prompt i's mask
        for i, p in enumerate(msg.prompts):
            want = full_resolution(p.mask, msg.source_shape, 2)
            np.testing.assert_array_equal(pixels[i].astype(bool), want.astype(bool))
        # distinct masks per prompt (tests/conftest.py): segments swapped would fail the loop above
        assert len({pixels[i].astype(bool).tobytes() for i in range(len(prompts))}) == len(prompts)
        assert seg.number_of_segments == 3
        if ref.ReferencedSOPInstanceUID == str(ref_dx.SOPInstanceUID):
            assert ds.PatientID == str(ref_dx.PatientID)
        else:
            found_cine_frames.add(frame_index)
    assert found_cine_frames == {0, 1}
    # Both validators are required (scripts/test.sh installs them): a missing one fails, never skips.
    dcmdump = shutil.which("dcmdump")  # dcmtk: parses every element strictly
    assert dcmdump, "dcmtk's dcmdump is needed to parse the SEG objects (apt-get install dcmtk)"
    for f in files:
        proc = subprocess.run([dcmdump, "-q", "+E", str(f)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    dciodvfy = shutil.which("dciodvfy")  # dicom3tools' IOD validator (dcmtk has none)
    assert dciodvfy, "dicom3tools' dciodvfy is needed to validate the SEG IOD (apt-get install dicom3tools)"
    for f in files:
        proc = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=30)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


# --------------------------------------------------------------------------- C subscriber


def _build_c_subscriber(tmp_path: Path) -> Path:
    # Required, never skipped (scripts/test.sh installs them): a missing one fails the test.
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler to build the C subscriber (apt-get install gcc)"
    assert any(Path(d, "zmq.h").exists() for d in ("/usr/include", "/usr/local/include")), (
        "libzmq headers missing (apt-get install libzmq3-dev)"
    )
    exe = tmp_path / "fsam_sub"
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-Werror", "-o", str(exe), str(C_SOURCE), "-lzmq"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.mark.parametrize("encoding", ["bits", "u8"])
def test_c_subscriber_prints_what_python_sees(tmp_path, bundle, encoding):
    exe = _build_c_subscriber(tmp_path)
    import cv2

    rec = tmp_path / "frames"
    rec.mkdir()
    for i in range(3):
        cv2.imwrite(str(rec / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (45, 61), np.uint8))
    source = {"kind": "replay", "path": str(rec), "fps": 10}
    endpoint = f"ipc://{tmp_path}/masks"
    proc = subprocess.Popen(
        [str(exe), endpoint, "carm0", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        with running_node(
            tmp_path, bundle, source, prompts=("lungs", "heart"), mask_encoding=encoding, downsample=3
        ) as (
            _app,
            sub,
        ):
            msgs = list(sub.messages(3, timeout=20, newest=False))
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    expected = [
        f"frame {m.frame_id} seq {m.seq} prompts 2 sums "
        + " ".join(str(int(p.mask.sum())) for p in m.prompts)
        for m in msgs
    ]
    assert len(expected) == 3
    # The two prompts' masks differ (tests/conftest.py), so prompts printed in the wrong order fail.
    assert any(int(m.prompts[0].mask.sum()) != int(m.prompts[1].mask.sum()) for m in msgs)
    assert out.splitlines() == expected


def test_c_subscriber_rejects_another_protocol_version(tmp_path):
    exe = _build_c_subscriber(tmp_path)
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path}/pub")
    proc = subprocess.Popen(
        [str(exe), f"ipc://{tmp_path}/pub", "", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        pub.send_multipart([b"s", msgpack.packb({"v": 3, "kind": "masks", "frame_id": 1, "prompts": []})])
        _, err = proc.communicate(timeout=10)
    finally:
        pub.close(0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4
    assert "protocol version 3" in err


def test_c_subscriber_prints_tool_tips_like_bridge_listen(tmp_path):
    """Version 2 with geometry, then a geometry-only message: the C subscriber and
    ``fluorosam-rt bridge listen`` print the same line, tips included."""
    exe = _build_c_subscriber(tmp_path)
    import zmq
    from test_protocol import _geometry_message

    from bridge.cli import listen_line
    from bridge.protocol import encode_message

    msg = _geometry_message()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path}/pub")
    proc = subprocess.Popen(
        [str(exe), f"ipc://{tmp_path}/pub", "", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        pub.send_multipart(encode_message(msg))
        full_line = listen_line(msg)
        msg.seq = 1
        pub.send_multipart(encode_message(msg, planes=False))
        out, err = proc.communicate(timeout=20)
    finally:
        pub.close(0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    msg.planes = False
    for p in msg.prompts:
        p.mask = None
    lines = out.splitlines()
    assert lines == [full_line, listen_line(msg)]
    tip = msg.prompts[1].geometry.instances[0]
    assert f" tips 1:{tip.id}:{tip.tip[0]:.2f},{tip.tip[1]:.2f}" in lines[0]
    assert " sums - - tips" in lines[1]


# --------------------------------------------------------------------------- recorder -> replay


def test_record_then_replay_feeds_the_node_the_same_frames(tmp_path, bundle):
    import cv2

    from bridge.recorder import Recorder, read_recording_masks
    from fluorosam_rt.sources.replay import ReplaySource

    rec = tmp_path / "in"
    rec.mkdir()
    for i in range(3):
        cv2.imwrite(str(rec / f"{i}.png"), np.random.default_rng(10 + i).integers(0, 255, (40, 56), np.uint8))
    source = {"kind": "replay", "path": str(rec), "fps": 10}
    recorder = Recorder(tmp_path / "recording")
    with running_node(tmp_path, bundle, source, prompts=("lungs",), include_image=True) as (_app, sub):
        try:
            assert recorder.run(sub, max_messages=3, idle_timeout=20) == 3
        finally:
            recorder.close()
    rows = read_recording_masks(tmp_path / "recording")
    assert [r["frame_id"] for r in rows] == [0, 1, 2]
    assert rows[0]["masks"].shape == (1, 40, 56)
    assert rows[0]["model"] == bundle.name
    replay = ReplaySource(tmp_path / "recording" / "frames")
    assert len(replay.frames) == 3
    original = ReplaySource(rec)
    for (got, _), (want, _) in zip(replay.frames, original.frames):
        # the preview is display-scaled (min-max), so compare after the same scaling
        w = want.astype(np.float64)
        w = np.round((w - w.min()) * 255 / max(w.max() - w.min(), 1))
        assert np.abs(got.astype(np.float64) - w).max() <= 1
