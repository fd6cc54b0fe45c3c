"""Bad input gets a clear error and the node keeps running (issue 9).

DICOM objects go through a real Storage SCP with pynetdicom as the sender and must get the
standard's C-STORE status; images go through the real node's frame path; control requests go
over the real REP socket; wire messages through the bridge decoder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from bridge.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    MaskMessage,
    PromptResult,
    ProtocolError,
    ProtocolVersionError,
    decode_message,
    encode_message,
)
from fluorosam_rt.service.control import MAX_REQUEST_BYTES, send_command
from fluorosam_rt.service.node_config import ControlSettings, PublishSettings
from fluorosam_rt.sources.base import Frame
from fluorosam_rt.sources.dicom_scp import DicomStorageSource

sys.path.insert(0, str(Path(__file__).parent))
from test_node import (
    running_node,
    wait_for,
)
from test_sources import XA, Collector, _pynetdicom_store, multiframe_xa

CT = "1.2.840.10008.5.1.4.1.1.2"

# --------------------------------------------------------------------------- DICOM


@pytest.fixture(scope="module")
def scp():
    src, sink = (
        DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", max_frame_pixels=256 * 256),
        Collector(),
    )
    src.start(sink)
    try:
        yield src, sink
    finally:
        src.stop()


def _xa(tmp_path: Path, **changes) -> object:
    ds = multiframe_xa(tmp_path / "x.dcm", n_frames=1, rows=16, cols=16)
    for k, v in changes.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


def _bits8(ds):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(ds.Rows * ds.Columns)
    return ds


BAD_DICOM = {
    # name: (changes, expected status range)
    "no_pixel_data": ({"PixelData": None}, (0xC000, 0xCFFF)),
    "no_rows": ({"Rows": None}, (0xC000, 0xCFFF)),
    "bits_allocated_12": ({"BitsAllocated": 12}, (0xC000, 0xCFFF)),
    "bits_allocated_16_with_8bit_data": ({"PixelData": bytes(16 * 16)}, (0xC000, 0xCFFF)),
    "bits_stored_over_allocated": ({"BitsStored": 24, "HighBit": 23}, (0xC000, 0xCFFF)),
    "rgb_with_one_sample": ({"PhotometricInterpretation": "RGB"}, (0xC000, 0xCFFF)),
    "mono_with_three_samples": ({"SamplesPerPixel": 3}, (0xC000, 0xCFFF)),
    "palette_without_lut": ({"PhotometricInterpretation": "PALETTE COLOR"}, (0xC000, 0xCFFF)),
    "frames_over_limit": ({"Rows": 512, "Columns": 512}, (0xA700, 0xA7FF)),
    "huge_frame_count": ({"NumberOfFrames": 100_000}, (0xA700, 0xA7FF)),
    "unknown_photometric": ({"PhotometricInterpretation": "NEGATIVE"}, (0xC000, 0xCFFF)),
}


@pytest.mark.parametrize("case", sorted(BAD_DICOM))
def test_bad_dicom_gets_the_right_c_store_status(scp, tmp_path, case):
    src, sink = scp
    changes, (lo, hi) = BAD_DICOM[case]
    before = len(sink.frames)
    status, _ = _pynetdicom_store(src.address[1], _xa(tmp_path, **changes), [XA])
    assert status is not None
    assert lo <= status.Status <= hi, f"{case}: 0x{status.Status:04X}"
    assert "ErrorComment" in status
    # the SCP is still up and takes the next good object
    status, _ = _pynetdicom_store(src.address[1], _xa(tmp_path), [XA])
    assert status.Status == 0x0000
    assert len(sink.wait(before + 1)) == before + 1


def test_unsupported_sop_class_refused_at_association_and_counted(scp, tmp_path):
    src, _ = scp
    ds = _xa(tmp_path, SOPClassUID=CT)
    status, assoc = _pynetdicom_store(src.address[1], ds, [CT])
    assert status is None  # no presentation context: the sender learns before sending pixels
    assert not assoc.is_established
    n = src.status_counts.get(0x0000, 0)
    status, _ = _pynetdicom_store(src.address[1], _xa(tmp_path), [XA])  # and the SCP is still up
    assert status.Status == 0x0000
    assert src.status_counts[0x0000] == n + 1


def test_monochrome1_is_inverted_to_bright_is_dense(scp, tmp_path):
    src, sink = scp
    n = len(sink.frames)
    mono2 = _xa(tmp_path)
    mono1 = _xa(tmp_path, PhotometricInterpretation="MONOCHROME1")
    mono1.PixelData = mono2.PixelData
    for ds in (mono2, mono1):
        status, _ = _pynetdicom_store(src.address[1], ds, [XA])
        assert status.Status == 0x0000
    a, b = (f.pixels.astype(np.int64) for f in sink.wait(n + 2)[n : n + 2])
    assert b.shape == a.shape
    # MONOCHROME1 stores white as 0: after inversion the order of every pixel pair is reversed.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < -0.99
    assert sink.frames[n + 1].meta.get("inverted") is True


def test_private_tags_are_ignored(scp, tmp_path):
    src, sink = scp
    n = len(sink.frames)
    plain = _xa(tmp_path)
    private = _xa(tmp_path)
    private.PixelData = plain.PixelData
    block = private.private_block(0x0029, "ACME CARM 1.0", create=True)
    block.add_new(0x10, "LO", "secret vendor thing")
    block.add_new(0x11, "OB", b"\x00\xff" * 500)
    private.add_new(0x00291200, "UN", b"\x01\x02\x03")  # a private element with no creator
    for ds in (plain, private):
        status, _ = _pynetdicom_store(src.address[1], ds, [XA])
        assert status.Status == 0x0000
    a, b = sink.wait(n + 2)[n : n + 2]
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert not any("ACME" in str(v) or "secret" in str(v) for v in b.meta.values())


def test_dicom_over_a_byte_limit_is_refused(tmp_path):
    """4096 x 4096 is within the pixel limit, but an RGB 16-bit frame of it is 96 MB."""
    src, sink = (
        DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", max_frame_bytes=1000),
        Collector(),
    )
    src.start(sink)
    try:
        status, _ = _pynetdicom_store(src.address[1], _xa(tmp_path), [XA])  # 16*16*2 = 512 bytes: fine
        assert status.Status == 0x0000
        big = multiframe_xa(tmp_path / "b.dcm", n_frames=1, rows=32, cols=32)  # 2048 bytes
        status, _ = _pynetdicom_store(src.address[1], big, [XA])
        assert status.Status == 0xA700
    finally:
        src.stop()
    assert src.rejected["too_large"] == 1


# --------------------------------------------------------------------------- images through the node


def _one_frame_replay(tmp_path: Path) -> dict:
    d = tmp_path / "frames"
    d.mkdir()
    cv2.imwrite(str(d / "0.png"), np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    return {"kind": "replay", "path": str(d), "fps": 10, "loop": False}


def test_bad_images_are_dropped_and_odd_ones_are_segmented(tmp_path, bundle):
    rng = np.random.default_rng(3)
    full16 = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    full16[0, 0], full16[0, 1] = 0, 65535
    grabber = np.zeros((48, 64, 3), np.uint8)
    cv2.circle(grabber, (32, 24), 16, (200, 190, 210), -1)  # BGR, as a frame grabber delivers
    cases = [
        ("zero_size", np.zeros((0, 0), np.uint8), "bad_frame"),
        ("zero_rows", np.zeros((0, 32), np.uint16), "bad_frame"),
        ("nan", np.full((16, 16), np.nan, np.float32), "bad_frame"),
        ("inf_pixel", np.where(np.eye(16) > 0, np.inf, 1.0).astype(np.float32), "bad_frame"),
        ("huge_float", np.full((8, 8), 3e38, np.float32), "bad_frame"),
        ("four_d", np.zeros((2, 2, 2, 2), np.uint8), "bad_frame"),
        ("complex", np.zeros((8, 8), np.complex64), "bad_frame"),
        ("one_by_one", np.full((1, 1), 7, np.uint8), None),
        ("constant", np.full((32, 32), 1000, np.uint16), None),
        ("full_range_u16", full16, None),
        ("rgb_grabber", grabber, None),
        ("bool", np.eye(20, dtype=bool), None),
    ]
    with running_node(tmp_path, bundle, _one_frame_replay(tmp_path)) as (app, sub):
        node = app.node
        wait_for(lambda: node.source.finished.is_set() and node.idle(), 30, "the replay frame")
        sub.receive(timeout=10)
        for i, (name, pixels, reason) in enumerate(cases):
            before = node.accounting.snapshot()
            node.receive(Frame(pixels=pixels, frame_id=1000 + i, source_ts_ns=time.time_ns()))
            wait_for(node.idle, 30, f"{name} accounted")
            after = node.accounting.snapshot()
            if reason is None:
                assert after["published"] == before["published"] + 1, (name, after)
                msg = sub.receive(timeout=10)
                assert msg.frame_id == 1000 + i
                assert msg.source_shape == pixels.shape[:2]
                assert msg.prompts[0].mask.shape == pixels.shape[:2]
            else:
                assert after["dropped"].get(reason, 0) == before["dropped"].get(reason, 0) + 1, (name, after)
                assert node.last_error
        # the node never switched engines over bad input, and still works
        assert node.engine.switches == []
        assert node.engine.consecutive_failures == 0


# --------------------------------------------------------------------------- control socket


def _raw(endpoint: str, payload: bytes, timeout: float = 10.0) -> dict:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    try:
        s.connect(endpoint)
        s.send(payload)
        return json.loads(s.recv())
    finally:
        s.close(linger=0)


CONTROL_ABUSE = {
    "malformed_json": b'{"cmd": "add", "prompts": [',
    "not_utf8": b'{"cmd": "add", "prompts": ["\xff\xfe"]}',
    "lone_surrogate": b'{"cmd": "add", "prompts": ["\\ud800"]}',
    "json_array": b'["add", "lungs"]',
    "json_scalar": b"42",
    "empty_message": b"",
    "unknown_command": b'{"cmd": "rm -rf"}',
    "missing_command": b'{"prompts": ["lungs"]}',
    "command_not_a_string": b'{"cmd": ["add"]}',
    "unknown_field": b'{"cmd": "list", "sudo": true}',
    "empty_prompt": b'{"cmd": "add", "prompts": [""]}',
    "whitespace_prompt": b'{"cmd": "add", "prompts": ["  \\t "]}',
    "empty_list": b'{"cmd": "add", "prompts": []}',
    "giant_prompt": json.dumps({"cmd": "add", "prompts": ["lung " * 2000]}).encode(),
    "thousands_of_prompts": json.dumps({"cmd": "add", "prompts": [f"p{i}" for i in range(5000)]}).encode(),
    "over_prompt_limit": json.dumps({"cmd": "set", "prompts": [f"organ {i}" for i in range(40)]}).encode(),
    "over_request_size": json.dumps({"cmd": "add", "prompts": ["x" * (MAX_REQUEST_BYTES + 10)]}).encode(),
    "deep_nesting": b'{"cmd": "add", "prompts": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "prompt_as_number": b'{"cmd": "add", "prompts": [3]}',
    "bad_points": b'{"cmd": "add", "prompts": [{"text": "a", "points": [[1, 2, 3]]}]}',
    "nan_point": b'{"cmd": "add", "prompts": [{"text": "a", "points": [[NaN, 2]]}]}',
    "bad_label": b'{"cmd": "add", "prompts": [{"text": "a", "points": [[1, 2]], "labels": [7]}]}',
    "long_id": json.dumps({"cmd": "add", "prompts": [{"text": "a", "id": "i" * 65}]}).encode(),
    "duplicate_ids": b'{"cmd": "add", "prompts": [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}]}',
    "remove_unknown": b'{"cmd": "remove", "ids": ["nope"]}',
    "remove_empty": b'{"cmd": "remove", "ids": []}',
    "flow_negative": b'{"cmd": "flow", "since": -1}',
}


def test_control_abuse_gets_error_replies_and_changes_nothing(tmp_path, bundle):
    source = _one_frame_replay(tmp_path)
    ctl = f"ipc://{tmp_path}/control"
    with running_node(tmp_path, bundle, source, prompts=("lungs", "heart")) as (app, _sub):
        node = app.node
        state = (node.prompts.snapshot(), node.predictor.cache.encode_count)
        status0 = send_command(ctl, {"cmd": "status"})["status"]
        for name, payload in CONTROL_ABUSE.items():
            if len(payload) > 4 * MAX_REQUEST_BYTES:
                continue
            reply = _raw(ctl, payload)
            assert reply["ok"] is False, name
            assert reply["error"]["code"] != "internal", (name, reply)
            assert reply["error"]["message"], name
            assert (node.prompts.snapshot(), node.predictor.cache.encode_count) == state, name
        # a message over the socket's size limit is dropped by libzmq: no reply, and no harm
        with pytest.raises(zmq.Again):
            _raw(ctl, b"{" + b" " * (4 * MAX_REQUEST_BYTES + 1) + b"}", timeout=1.0)
        # valid unicode is fine: an operator may prompt in any language
        reply = send_command(ctl, {"cmd": "add", "prompts": [{"text": "Lunge – 肺 🫁", "id": "u"}]})
        assert reply["ok"], reply
        assert reply["prompts"][-1]["text"] == "Lunge – 肺 🫁"
        assert send_command(ctl, {"cmd": "remove", "ids": ["u"]})["ok"]
        status1 = send_command(ctl, {"cmd": "status"})["status"]
        assert status1["prompts"] == status0["prompts"]
        assert app.control.errors >= len(CONTROL_ABUSE) - 1


def test_control_and_stream_bind_to_localhost_by_default():
    assert ControlSettings().endpoint.startswith("tcp://127.0.0.1:")
    assert all(ep.startswith("tcp://127.0.0.1:") for ep in PublishSettings().endpoints)


# --------------------------------------------------------------------------- wire decoding


def _wire() -> list[bytes]:
    msg = MaskMessage(
        stream="carm0",
        frame_id=1,
        seq=1,
        timestamps_ns={"received": 1, "published": 2},
        source={},
        geometry={},
        source_shape=(10, 12),
        downsample=1,
        encoding="u8",
        prompts=[PromptResult("a", "a", 0.9, True, np.ones((10, 12), np.uint8))],
    )
    return [f if isinstance(f, bytes) else np.asarray(f).tobytes() for f in encode_message(msg)]


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda f: f[:1], ProtocolError),  # truncated: header missing
        (lambda f: f[:2], ProtocolError),  # truncated: payload missing
        (lambda f: [f[0], f[1][:-5], *f[2:]], ProtocolError),  # truncated header
        (lambda f: [f[0], f[1], f[2][:-1]], ProtocolError),  # truncated payload
        (lambda f: [f[0], f[1], f[2] + b"\0"], ProtocolError),  # oversized payload
        (lambda f: [f[0], b"\x00" * (MAX_HEADER_BYTES + 1), *f[2:]], ProtocolError),  # oversized header
        (lambda f: [*f, b"extra"], ProtocolError),  # more parts than announced
        (
            lambda f: [f[0], msgpack.packb({**msgpack.unpackb(f[1]), "v": PROTOCOL_VERSION + 1}), *f[2:]],
            ProtocolVersionError,
        ),
        (lambda f: [f[0], msgpack.packb({**msgpack.unpackb(f[1]), "v": 0}), *f[2:]], ProtocolVersionError),
    ],
    ids=[
        "no_header",
        "no_payload",
        "cut_header",
        "cut_payload",
        "long_payload",
        "huge_header",
        "extra",
        "v_next",
        "v0",
    ],
)
def test_bad_wire_messages_raise_typed_errors(mutate, error):
    with pytest.raises(error):
        decode_message(mutate(_wire()))
    assert issubclass(ProtocolVersionError, ProtocolError)  # one except clause catches them all
