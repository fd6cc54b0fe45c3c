"""The geometry stage in a running node (issue 18): v2 headers with geometry, geometry-only and v1
endpoints side by side, and the demo sweep with a K-wire whose tip reaches ``fluorosam-rt view``
and the OpenIGTLink relay and moves with the wire.

The K-wire test replays the demo sweep's frames (upscaled to 1024²) with the wire drawn where the
sweep's recorded cameras project a 3-D wire; the embedded model cannot see it (it finds no K-wire
in the demo at all), so an oracle replaces the image encoder and mask decoder: it turns the drawn
wire into low-resolution logits, and everything after the decoder (presence gate, upsampling,
geometry, protocol, subscribers) is the node's real path.
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zmq

from bridge import Subscriber
from bridge.geometry import ijk_to_ras
from fluorosam_rt.service.node_config import load_settings
from fluorosam_rt.service.serve import build_app

sys.path.insert(0, str(Path(__file__).parent))
import protocol_v1
from synth_wires import draw_segment, sweep_wire
from test_node import assert_accounting, running_node, wait_for
from test_tracking import demo_frames

SIZE = 1024


def _recv_raw(sock: zmq.Socket, timeout_s: float = 30.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), "no message"
    return sock.recv_multipart()


def test_node_publishes_v2_geometry_only_and_v1_side_by_side(tmp_path, bundle):
    rec = tmp_path / "frames"
    rec.mkdir()
    for i in range(4):
        img = np.zeros((160, 200), np.uint8)
        cv2.circle(img, (60 + 10 * i, 80), 40, 200, -1)
        cv2.imwrite(str(rec / f"{i}.png"), img)
    geo_ep, v1_ep = f"ipc://{tmp_path}/geo", f"ipc://{tmp_path}/v1"
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"")
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(v1_ep)
    geo = Subscriber(geo_ep, topic="carm0", rcvhwm=100)
    source = {"kind": "replay", "path": str(rec), "fps": 4}
    try:
        with running_node(
            tmp_path,
            bundle,
            source,
            prompts=("lungs", "heart"),
            geometry_endpoints=[geo_ep],
            v1_endpoints=[v1_ep],
        ) as (app, sub):
            full = sub.receive(timeout=30, newest=False)
            g = geo.receive(timeout=30, newest=False)
            old = protocol_v1.decode_message(_recv_raw(raw))
            wait_for(lambda: app.node.accounting.snapshot()["published"] >= 4, 30, "4 frames")
            status, stats = app.node.status(), app.node.stats()
    finally:
        raw.close(0)
        geo.close()
    assert full.version == 2
    assert full.planes
    assert g.version == 2
    assert not g.planes
    assert (
        full.timestamps_ns["postprocessed"]
        <= full.timestamps_ns["geometry"]
        <= full.timestamps_ns["published"]
    )
    assert full.scene.id >= 1
    assert all(p.geometry is not None for p in full.prompts)
    assert all(p.mask is None and p.geometry is not None for p in g.prompts)
    assert old.version == 1
    assert [p.id for p in old.prompts] == ["lungs", "heart"]
    assert old.prompts[0].mask.shape == (160, 200)
    # the same frame on the full and the geometry-only socket carries the same geometry
    if g.frame_id == full.frame_id:
        assert [p.geometry.to_wire() for p in g.prompts] == [p.geometry.to_wire() for p in full.prompts]
    pub = status["publish"]
    assert set(pub) >= {"full", "geometry", "v1"}
    per_msg = {k: pub[k]["bytes_sent"] / pub[k]["messages"] for k in ("full", "geometry")}
    assert per_msg["geometry"] < per_msg["full"]
    assert set(stats["geometry"]) == {"scene", "outlines", "tools", "tracking", "total"}


# --------------------------------------------------------------------------- the demo sweep's K-wire


@pytest.fixture(scope="module")
def bundle1024(tmp_path_factory):
    """A random-weight model at 1024² input (low-res logits 256²): the oracle replaces its encoder
    and decoder, so only its sizes matter."""
    from fluorosam_rt.bundle import load_bundle
    from fluorosam_rt.checkpoint import save_native
    from fluorosam_rt.model.build import build_model
    from fluorosam_rt.model.config import small_realtime
    from fluorosam_rt.text.minilm import MiniLMTextEncoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt1024") / "small1024.safetensors"
    enc = MiniLMTextEncoder()
    save_native(build_model(small_realtime(SIZE)), path, {"kind": "minilm", "identity": enc.identity()}, {})
    return load_bundle(path)


def sweep_frames(folder: Path, frames: list[int]) -> list[np.ndarray]:
    """Demo frames at 1024² with the K-wire drawn at full brightness; returns each frame's true tip."""
    video = demo_frames()
    tips = []
    for k, f in enumerate(frames):
        tip, tail, width = sweep_wire(f, SIZE, shift_to_isocenter_mm=120.0)
        img = cv2.resize(video[f], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32) * (
            200 / 255
        )
        img = img.astype(np.uint8)
        img[draw_segment(tip, tail, width, (SIZE, SIZE)) > 0] = 255
        cv2.imwrite(str(folder / f"{k:03d}.png"), img)
        tips.append(tip)
    return tips


def install_oracle(app) -> None:
    """Encoder -> identity; decoder -> the drawn wire's signed distance, and a fixed lung ellipse."""
    p = app.node.predictor
    p.engine.encode_image = lambda x: x
    L = p.engine.low_res_size
    yy, xx = np.mgrid[:L, :L].astype(np.float32)
    lung = torch.tensor(8.0 * (1 - np.hypot((xx - 0.62 * L) / (0.16 * L), (yy - 0.45 * L) / (0.3 * L))))

    def decode(embedding, info, prompts):
        img = embedding[0, 0].numpy()
        wire = (img >= img.max() - 1e-3).astype(np.uint8)
        inside = cv2.distanceTransform(wire, cv2.DIST_L2, 5)
        outside = cv2.distanceTransform(1 - wire, cv2.DIST_L2, 5)
        signed = torch.tensor(inside - outside)[None, None]
        wire_logits = F.avg_pool2d(signed, img.shape[0] // L)[0, 0] + 0.5
        out = torch.stack([wire_logits if q.text == "K-wire" else lung for q in prompts])
        return out[:, None].repeat(1, 3, 1, 1), torch.full((len(prompts), 3), 0.95)

    p.decode = decode


def test_demo_sweep_k_wire_tip_reaches_view_and_igtl_and_moves(tmp_path, bundle1024):
    pyigtl = pytest.importorskip("pyigtl")
    from bridge.igtl_relay import AXIS_PREFIX, TIP_PREFIX, IgtlRelay, device_name
    from fluorosam_rt.service.node_cli import cmd_view

    frames = [2, 10, 18, 26, 34]
    rec = tmp_path / "sweep"
    rec.mkdir()
    truth = sweep_frames(rec, frames)
    pub = f"ipc://{tmp_path}/masks"
    settings = load_settings(
        None,
        {
            "source": {"kind": "replay", "path": str(rec), "fps": 2},
            "publish": {"endpoints": [pub], "include_image": True, "downsample": 2},
            "control": {"endpoint": None},
            "prompts": ["K-wire", "left lung"],
        },
    )
    app = build_app(settings, bundle=bundle1024)
    install_oracle(app)
    relay = IgtlRelay(port=0)
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", relay.port)
    relay_sub = Subscriber(pub, rcvhwm=100)
    stop = threading.Event()
    view_out = tmp_path / "view"
    view_args = argparse.Namespace(
        connect=pub,
        topic="",
        max_frames=len(frames),
        timeout=60.0,
        save=str(view_out),
        overlay=True,
        every=True,
    )
    printed = io.StringIO()

    def run_view() -> None:
        with redirect_stdout(printed):
            cmd_view(view_args)

    viewer = threading.Thread(target=run_view, daemon=True)
    worker = threading.Thread(target=relay.run, args=(relay_sub,), kwargs={"stop": stop}, daemon=True)
    points, axes = [], []
    try:
        wait_for(relay.server.is_connected, 10, "the pyigtl client to connect")
        viewer.start()
        worker.start()
        time.sleep(0.5)  # both subscriptions reach the publisher
        app.start()
        kw_id = app.node.prompts.snapshot()[0].id  # the normalised text, "k-wire"
        deadline = time.monotonic() + 90
        while len(points) < len(frames) and time.monotonic() < deadline:
            m = client.wait_for_message(device_name(kw_id, TIP_PREFIX), timeout=2)
            if m is not None:
                points.append(m)
                axes.append(client.wait_for_message(device_name(kw_id, AXIS_PREFIX), timeout=5))
        viewer.join(60)
    finally:
        stop.set()
        app.stop()
        if worker.is_alive():
            worker.join(5)
        relay_sub.close()
        client.stop()
        relay.close()
    assert_accounting(app.node.accounting.snapshot())
    # view: a header and an overlay per frame, contours and the tip drawn on it
    headers = sorted(view_out.glob("*.json"))
    assert len(headers) == len(frames), printed.getvalue()
    import json

    seen_tips = []
    for hpath in headers:
        h = json.loads(hpath.read_text())
        kw, lung = h["prompts"]
        assert lung["contours"]
        assert lung["instances"]
        inst = kw["instances"][0]
        seen_tips.append(inst["tip"])
        overlay = cv2.imread(str(hpath.with_name(hpath.stem + "_overlay.png")))
        tx, ty = (np.array(inst["tip"]) - 0.5) / 2  # source pixels -> the overlay's mask pixels
        patch = overlay[int(ty) - 3 : int(ty) + 4, int(tx) - 3 : int(tx) + 4].reshape(-1, 3)
        assert any(tuple(px) == (0, 159, 230) for px in patch), "no tip marker in the K-wire's colour"
    fids = [json.loads(h.read_text())["frame_id"] for h in headers]
    for fid, tip in zip(fids, seen_tips):
        assert np.hypot(*(np.array(tip) - truth[fid])) <= 4.0  # mask at half resolution: 2 px per mask pixel
    moved = max(np.hypot(*(np.array(a) - b)) for a in seen_tips for b in seen_tips)
    assert moved > 20, "the tip did not move with the wire"
    assert "tip#" in printed.getvalue()
    # OpenIGTLink: POINT at the tip, TRANSFORM origin at the tip, z along the axis
    assert len(points) >= 3, f"relayed {relay.relayed_frames} frames, {relay.sent} messages"
    matrix, _ = ijk_to_ras({}, (SIZE, SIZE), 1)
    ras_truth = [(matrix @ np.r_[t, 0, 1])[:3] for t in truth]
    for pm, am in zip(points, axes):
        xyz = np.asarray(pm.positions, float).reshape(-1, 3)[0]
        assert min(np.linalg.norm(xyz - r) for r in ras_truth) <= 4.0
        assert pm.names[0].startswith(f"{kw_id}#")
        assert am is not None
        np.testing.assert_allclose(am.matrix[:3, 3], xyz, atol=1e-3)
        assert abs(np.linalg.norm(am.matrix[:3, 2]) - 1) < 1e-6
