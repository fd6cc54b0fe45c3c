"""The wire protocol: round trips, the stated mask sizes, typed errors for bad input, no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from bridge.protocol import (
    PROTOCOL_VERSION,
    MaskMessage,
    PromptResult,
    ProtocolError,
    ProtocolVersionError,
    decode_message,
    encode_message,
    mask_shape,
)

BRIDGE = Path(__file__).resolve().parents[1] / "bridge"


def _message(encoding: str = "u8", downsample: int = 1, with_image: bool = False) -> MaskMessage:
    rng = np.random.default_rng(0)
    shape = mask_shape((37, 53), downsample)
    prompts = [
        PromptResult(
            id=f"p{i}",
            text=f"structure {i}",
            score=0.5 - i,
            present=i == 0,
            mask=rng.integers(0, 2, shape, np.uint8),
        )
        for i in range(3)
    ]
    return MaskMessage(
        stream="carm0",
        frame_id=41,
        seq=7,
        timestamps_ns={"received": 1_000_000, "published": 3_500_000},
        source={"source": "dicom", "SOPInstanceUID": "1.2.3", "frame_index": 2},
        geometry={"ImagerPixelSpacing": (0.2, 0.2), "DistanceSourceToDetector": 1000.0},
        source_shape=(37, 53),
        downsample=downsample,
        encoding=encoding,
        prompts=prompts,
        image=rng.integers(0, 255, shape, np.uint8) if with_image else None,
    )


@pytest.mark.parametrize("encoding", ["u8", "bits"])
@pytest.mark.parametrize("downsample", [1, 4])
def test_round_trip(encoding, downsample):
    msg = _message(encoding, downsample, with_image=True)
    frames = encode_message(msg)
    assert frames[0] == b"carm0"
    assert len(frames) == 2 + 3 + 1
    back = decode_message([bytes(f) for f in frames])
    assert back.frame_id == 41
    assert back.seq == 7
    assert back.version == PROTOCOL_VERSION
    assert back.mask_shape == mask_shape((37, 53), downsample)
    assert back.geometry["ImagerPixelSpacing"] == [0.2, 0.2]
    assert back.latency_ms() == pytest.approx(2.5)
    for a, b in zip(msg.prompts, back.prompts):
        assert (a.id, a.text, a.present) == (b.id, b.text, b.present)
        np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(msg.image, back.image)


def test_bit_packing_is_eight_times_smaller():
    u8 = encode_message(_message("u8"))
    bits = encode_message(_message("bits"))
    assert len(bytes(u8[2])) == 37 * 53
    assert len(bytes(bits[2])) == -(-37 * 53 // 8)


def test_mask_shape_covers_every_source_pixel():
    assert mask_shape((512, 512), 1) == (512, 512)
    assert mask_shape((513, 510), 4) == (129, 128)


def test_version_mismatch_is_a_typed_error():
    frames = [bytes(f) for f in encode_message(_message())]
    header = msgpack.unpackb(frames[1])
    header["v"] = PROTOCOL_VERSION + 1
    frames[1] = msgpack.packb(header)
    with pytest.raises(ProtocolVersionError, match="protocol version"):
        decode_message(frames)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f[:3], "parts"),  # payloads missing
        (lambda f: [f[0], f[1][:-5], *f[2:]], "msgpack"),  # truncated header
        (lambda f: [f[0], f[1], f[2][:-1], *f[3:]], "payload"),  # truncated mask
        (lambda f: [b"other", *f[1:]], "topic"),
        (lambda f: [f[0]], "at least 2"),
        (lambda f: [f[0], msgpack.packb([1, 2]), *f[2:]], "not a map"),
        (lambda f: [f[0], b"\xc1" * 10, *f[2:]], "msgpack"),
    ],
)
def test_malformed_messages_raise_protocol_error(mutate, match):
    frames = [bytes(f) for f in encode_message(_message())]
    with pytest.raises(ProtocolError, match=match):
        decode_message(mutate(frames))


def test_header_with_inconsistent_sizes_is_rejected():
    frames = [bytes(f) for f in encode_message(_message())]
    header = msgpack.unpackb(frames[1])
    header["mask"]["height"] = 10**6
    frames[1] = msgpack.packb(header)
    with pytest.raises(ProtocolError, match="out of range"):
        decode_message(frames)


def test_bridge_imports_only_numpy_zmq_msgpack():
    """Static: no module in bridge/ imports anything outside the allowed set (torch above all)."""
    allowed = {"numpy", "zmq", "msgpack", "bridge", "__future__"} | set(sys.stdlib_module_names)
    # The optional relays and the web viewer (extras: pyigtl, highdicom, aiohttp/Pillow) are
    # checked against their declared extras, and for torch, in tests/test_bridge.py.
    optional = {"igtl_relay.py", "seg_archive.py", "web.py", "web_packet.py"}
    for path in (p for p in BRIDGE.glob("*.py") if p.name not in optional):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_bridge_works_with_torch_unimportable():
    """Dynamic: with torch made unimportable, the bridge still imports and round-trips."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import bridge, numpy as np\n"
        "from bridge.protocol import MaskMessage, PromptResult\n"
        "p = PromptResult('a', 'a', 1.0, True, np.ones((4, 4), np.uint8))\n"
        "m = MaskMessage('s', 1, 0, {}, {}, {}, (4, 4), 1, 'bits', [p])\n"
        "back = bridge.decode_message([bytes(f) for f in bridge.encode_message(m)])\n"
        "assert back.prompts[0].mask.sum() == 16\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
    )
    root = BRIDGE.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- version 2: geometry


def _geometry_message(d: int = 1) -> MaskMessage:
    """A real geometry stage's output for a lung-like blob with a hole and a K-wire."""
    import math
    from types import SimpleNamespace as NS

    import cv2

    from fluorosam_rt.geometry_stage import GeometryOptions, GeometryStage, frame_spacing
    from fluorosam_rt.linear_tools import default_linear_tools

    sys.path.insert(0, str(Path(__file__).parent))
    from synth_wires import wire_mask

    src = (400, 500)
    lung = np.zeros(src, np.uint8)
    cv2.ellipse(lung, (150, 200), (90, 150), 0, 0, 360, 1, -1)
    cv2.circle(lung, (150, 200), 20, 0, -1)
    wire = wire_mask((380.0, 350.0), math.radians(60), 450, 7, src)  # leaves the top edge
    masks = [
        cv2.resize(m, (math.ceil(500 / d), math.ceil(400 / d)), interpolation=cv2.INTER_NEAREST)
        for m in (lung, wire)
    ]
    prompts = [NS(id="left lung", text="left lung"), NS(id="K-wire", text="K-wire")]
    meta = {
        "ImagerPixelSpacing": [0.3, 0.3],
        "DistanceSourceToDetector": 1200.0,
        "DistanceSourceToPatient": 800.0,
    }
    stage = GeometryStage(GeometryOptions(), default_linear_tools())
    scene = stage.begin_frame(np.zeros(src, np.uint16), meta)
    geoms = stage.process(prompts, masks, [True, True], d, src, meta)
    return MaskMessage(
        stream="carm0",
        frame_id=3,
        seq=0,
        timestamps_ns={"received": 1, "published": 2},
        source={},
        geometry=meta,
        source_shape=src,
        downsample=d,
        encoding="bits",
        prompts=[PromptResult(p.id, p.text, 0.9, True, m, g) for p, m, g in zip(prompts, masks, geoms)],
        spacing=frame_spacing(meta),
        scene=scene,
    )


@pytest.mark.parametrize("d", [1, 2])
def test_v2_round_trip_carries_typed_geometry(d):
    import math

    msg = _geometry_message(d)
    back = decode_message([bytes(f) for f in encode_message(msg)])
    assert back.version == 2
    assert back.planes
    assert back.spacing == msg.spacing
    assert back.spacing.basis == "ImagerPixelSpacing@isocenter"
    assert back.scene.cut == "start"
    lung, wire = (p.geometry for p in back.prompts)
    assert lung.to_wire() == msg.prompts[0].geometry.to_wire()
    assert len(lung.outline(lung.instances[0])) == 2  # outline and the hole
    assert lung.area_mm2 == pytest.approx(lung.area_px * 0.04, rel=1e-3)
    tip = wire.instances[0]
    assert isinstance(tip.polyline, np.ndarray)
    assert tip.polyline.shape[1] == 2
    assert np.hypot(tip.tip[0] - 380, tip.tip[1] - 350) <= 3 * d
    assert wire.tips == [tip.tip]
    assert tip.tip_by == "border"
    assert tip.length_mm == pytest.approx(350.5 / math.sin(math.radians(60)) * 0.2, rel=0.02)
    np.testing.assert_array_equal(back.prompts[0].mask, msg.prompts[0].mask)


def test_geometry_only_messages_have_no_planes_and_are_small():
    msg = _geometry_message()
    full = [bytes(f) for f in encode_message(msg)]
    geo = [bytes(f) for f in encode_message(msg, planes=False)]
    assert len(geo) == 2
    back = decode_message(geo)
    assert not back.planes
    assert all(p.mask is None for p in back.prompts)
    assert [p.geometry.to_wire() for p in back.prompts] == [p.geometry.to_wire() for p in msg.prompts]
    assert sum(map(len, geo)) < sum(map(len, full)) / 5
    with pytest.raises(ProtocolError, match="geometry-only"):
        encode_message(msg, planes=False, version=1)


def test_a_v1_subscriber_keeps_working():
    """The frozen version-1 decoder reads what a node writes for v1 endpoints, refuses v2 with its
    typed error, and this decoder still reads version-1 messages (old recordings, old nodes)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import protocol_v1

    msg = _geometry_message()
    v1 = [bytes(f) for f in encode_message(msg, version=1)]
    old = protocol_v1.decode_message(v1)
    assert old.version == 1
    for a, b in zip(msg.prompts, old.prompts):
        assert (a.id, a.score, a.present) == (b.id, b.score, b.present)
        np.testing.assert_array_equal(a.mask, b.mask)
    header = msgpack.unpackb(v1[1])
    assert header["v"] == 1
    assert "contours" not in header["prompts"][0]
    assert "planes" not in header["mask"]
    with pytest.raises(protocol_v1.ProtocolVersionError, match="version 2"):
        protocol_v1.decode_message([bytes(f) for f in encode_message(msg)])
    new = decode_message(v1)
    assert new.version == 1
    assert new.prompts[0].geometry is None
    assert new.spacing is None


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h["prompts"][1]["instances"][0].update(tip=[1.0, float("nan")]), "not finite"),
        (lambda h: h["prompts"][1]["instances"][0].update(axis=[1.0, 1.0]), "unit vector"),
        (lambda h: h["prompts"][1]["instances"][0].update(contour=7), "not in contours"),
        (lambda h: h["prompts"][0].update(contours=[[[[1, 2], [3]]]]), "points"),
        (lambda h: h["prompts"][0].update(bbox=[0, 0, 0, 5]), "extent"),
        (lambda h: h["prompts"][0].update(absent={"x": 1}), "reason"),
        (lambda h: h.update(spacing={"row_mm": -1, "col_mm": 1, "basis": "PixelSpacing"}), "positive"),
        (lambda h: h.update(scene={"id": 1, "cut": "earthquake"}), "scene cut"),
        (lambda h: h["mask"].update(planes="no"), "planes"),
    ],
)
def test_malformed_geometry_is_a_protocol_error(edit, match):
    frames = [bytes(f) for f in encode_message(_geometry_message())]
    header = msgpack.unpackb(frames[1])
    edit(header)
    frames[1] = msgpack.packb(header)
    with pytest.raises(ProtocolError, match=match):
        decode_message(frames)
