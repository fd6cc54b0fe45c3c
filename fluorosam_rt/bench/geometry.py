"""The geometry stage in the benchmark (issue 18): its cost per sub-stage, flicker with and without
smoothing, and what a geometry-only subscription saves.

Three measurements, each on the node's own code (geometry_stage.py, Node._infer, MaskPublisher):

* **cost**: the stage for K prompts at 1024², timed per sub-stage (scene check, outlines,
  tools, tracking) in wall time and in the thread's CPU time (the machine is shared; CPU time is
  what the stage itself needs). Two mask sets: the model's own masks for the benchmark's K
  prompts on its frames (what the node really traces), and synthetic anatomy with ten ribs and
  a K-wire (many long outlines, a tool fit: a heavier case).
* **flicker**: 1 - IoU of consecutive masks on the replayed demo sweep, through Node._infer
  with the embedded model, smoothing off and on; and tool-tip jitter on the same sweep's
  cameras with a K-wire whose low-resolution logits are its signed distance plus stated noise
  (the embedded model finds no K-wire in the demo: it is outside the field of view there, and
  the model is being retrained), so the tip's truth is known. The latency cost of smoothing is
  its compute time per frame (it never holds a frame back) and the lag it adds to a moving tip.
* **transport**: K prompts of 1024² masks published over TCP to a subscriber process, full
  messages vs geometry-only: bytes per message and publish -> decoded-by-subscriber time.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import cv2
import numpy as np
import torch

from ..geometry_stage import SUBSTAGES, GeometryOptions, GeometryStage, support_rois
from ..linear_tools import default_linear_tools
from ..service.flow import describe_ms

DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"
SWEEP_PROMPTS = ("left lung", "right lung", "heart")


def _stats(ms: Sequence[float]) -> dict[str, float]:
    return describe_ms(np.asarray(ms, dtype=np.float64)) if len(ms) else {}


# --------------------------------------------------------------------------- mask sets


def upsample(low: torch.Tensor, out_hw: tuple[int, int], img_size: int) -> tuple[list[np.ndarray], list]:
    """Masks and ROI bounds exactly as the node makes them from [K, L, L] logits (square input)."""
    from ..predictor import Predictor

    h, w = out_hw
    resized = (round(img_size * h / max(h, w)), round(img_size * w / max(h, w)))  # inside the padded input
    info = NS(resized_hw=resized, original_hw=out_hw)
    logits = Predictor.logits_planes(NS(engine=NS(img_size=img_size)), low, info, out_hw)
    masks = [(logits[i] > 0).view(np.uint8) for i in range(low.shape[0])]
    return masks, support_rois(low, 0.0, img_size, resized, out_hw)


def synthetic_anatomy(k: int = 10, L: int = 256, shift: float = 0.0) -> tuple[list[str], torch.Tensor]:
    """Logits of K chest-like structures at L² (signed distance in low-res pixels), a K-wire last."""
    yy, xx = np.mgrid[:L, :L].astype(np.float32) * (256.0 / L)
    xx = xx - shift

    def ell(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        return (1 - np.hypot((xx - cx) / a, (yy - cy) / b)) * min(a, b)

    def band(x0: float, y0: float, x1: float, y1: float, w: float) -> np.ndarray:
        d = np.array([x1 - x0, y1 - y0], np.float32)
        n = float(np.linalg.norm(d))
        d /= n
        t = (xx - x0) * d[0] + (yy - y0) * d[1]
        s = np.abs(-(xx - x0) * d[1] + (yy - y0) * d[0])
        return np.minimum(w / 2 - s, np.minimum(t, n - t))

    arcs = [3 - np.abs(yy - (40 + 18 * j) - 0.002 * (xx - 128) ** 2) for j in range(10)]
    ribs = np.minimum(np.max(arcs, axis=0), 100 - np.abs(xx - 128))
    fields = {
        "left lung": ell(180, 120, 45, 75),
        "right lung": ell(76, 120, 45, 75),
        "heart": ell(140, 150, 35, 30),
        "spine": band(128, 10, 128, 250, 14),
        "left clavicle": band(140, 40, 220, 30, 5),
        "right clavicle": band(116, 40, 36, 30, 5),
        "trachea": band(128, 10, 128, 80, 6),
        "aorta": ell(135, 90, 10, 25),
        "ribs": ribs,
        "K-wire": band(60, 200, 160, 120, 1.6),
    }
    names = [*list(fields)[: k - 1], "K-wire"] if k <= len(fields) else list(fields)
    return names, torch.tensor(np.stack([fields[n] for n in names]))


def model_mask_frames(
    bundle: Any, frames: Sequence[np.ndarray], texts: Sequence[str], downsample: int = 1
) -> list[tuple[list, list]]:
    """The embedded model's masks (and the node's ROI bounds) for texts on each frame, at the
    node's published size for ``downsample`` (publish.downsample)."""
    p = bundle.predictor(presence_threshold=-1e9)
    p.add_prompts(list(texts))
    prompts = [NS(text=t, points=(), labels=()) for t in texts]
    out = []
    for f in frames:
        x, info = p.preprocess(f)
        chosen, _ = p.select(*p.decode(p.encode(x), info, prompts))
        hw = (-(-f.shape[0] // downsample), -(-f.shape[1] // downsample))
        logits = p.logits_planes(chosen, info, hw)
        masks = [(logits[i] > p.mask_threshold).view(np.uint8) for i in range(len(texts))]
        rois = support_rois(chosen, p.mask_threshold, p.engine.img_size, info.resized_hw, hw)
        out.append((masks, rois))
    return out


# --------------------------------------------------------------------------- cost


def time_stage(
    texts: Sequence[str],
    frames: Sequence[tuple[list, list]],
    image_hw: tuple[int, int],
    repeats: int,
    downsample: int = 1,
    trace_stride: int = GeometryOptions.trace_stride,
) -> dict[str, Any]:
    """Per sub-stage wall ms (the stage's own clock) and the whole stage's thread CPU ms, with its
    minimum (what the stage costs on a core nobody else wants)."""
    stage = GeometryStage(GeometryOptions(trace_stride=trace_stride), default_linear_tools())
    prompts = [NS(id=t, text=t) for t in texts]
    meta = {"ImagerPixelSpacing": [0.2, 0.2]}
    image = np.zeros(image_hw, np.uint16)
    cpu, n_inst, n_vertices = [], [], []
    present = [True] * len(texts)
    for r in range(repeats):
        for masks, rois in frames:
            c0 = time.thread_time_ns()
            stage.begin_frame(image, meta)
            g = stage.process(prompts, masks, present, downsample, image_hw, meta, rois)
            cpu.append((time.thread_time_ns() - c0) / 1e6)
            if r == 0:
                n_inst.append(sum(len(x.instances) for x in g))
                n_vertices.append(sum(len(ring) for x in g for poly in x.contours for ring in poly))
    rows = stage.times.rows()
    wall = {name: _stats(rows[:, j] / 1e6) for j, name in enumerate(SUBSTAGES)}
    wall["total"] = _stats(rows.sum(axis=1) / 1e6)
    return {
        "prompts": len(texts),
        "downsample": downsample,
        "trace_stride": trace_stride,
        "cpu_min_ms": float(min(cpu)),
        "frames": len(frames),
        "calls": len(cpu),
        "wall_ms": wall,
        "cpu_ms": _stats(cpu),
        "instances_per_frame": float(np.mean(n_inst)),
        "contour_vertices_per_frame": float(np.mean(n_vertices)),
    }


# --------------------------------------------------------------------------- flicker


def demo_sweep() -> tuple[list[np.ndarray], dict[str, Any]]:
    cap = cv2.VideoCapture(str(DEMO_DIR / "chest_sweep.mp4"))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f[:, :, 0])
    return frames, json.loads((DEMO_DIR / "chest_sweep.json").read_text())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


class _Timed:
    """Wraps a callable and keeps its wall times (ms)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.ms = fn, []

    def __call__(self, *a: Any) -> Any:
        t0 = time.perf_counter_ns()
        out = self.fn(*a)
        self.ms.append((time.perf_counter_ns() - t0) / 1e6)
        return out


def _node(bundle: Any, smoothing: float, texts: Sequence[str], predictor: Any = None) -> Any:
    from ..prompts import Prompt
    from ..service.node import Node

    p = predictor or bundle.predictor()
    node = Node(
        p, NS(), NS(), geometry=GeometryStage(GeometryOptions(smoothing=smoothing), default_linear_tools())
    )
    node.prompts.set([Prompt(t) for t in texts])
    node.geometry.smooth = _Timed(node.geometry.smooth)
    return node


def _run_frames(node: Any, frames: Sequence[np.ndarray], meta: dict[str, Any]) -> list[Any]:
    from ..sources.base import Frame

    out = []
    for i, px in enumerate(frames):
        now = time.time_ns()
        out.append(
            node._infer(Frame(px, i, now, dict(meta), now), {"source": now, "received": now, "dequeued": now})
        )
    return out


def _stage_ms(done: Sequence[Any], a: str, b: str) -> dict[str, float]:
    return _stats([(d.t[b] - d.t[a]) / 1e6 for d in done])


def anatomy_flicker(bundle: Any, weights: Sequence[float], limit: int | None = None) -> dict[str, Any]:
    """1 - IoU of consecutive masks of the demo sweep's prompts, per smoothing weight."""
    frames, _ = demo_sweep()
    frames = frames[:limit]
    out: dict[str, Any] = {"frames": len(frames), "prompts": list(SWEEP_PROMPTS), "by_weight": {}}
    for w in weights:
        node = _node(bundle, w, SWEEP_PROMPTS)
        done = _run_frames(node, frames, {})
        per: dict[str, Any] = {}
        for k, text in enumerate(SWEEP_PROMPTS):
            flick = [1 - _iou(a.masks[k] > 0, b.masks[k] > 0) for a, b in itertools.pairwise(done)]
            per[text] = {"mean": float(np.mean(flick)), "p95": float(np.percentile(flick, 95))}
        out["by_weight"][str(w)] = {
            "flicker": per,
            "flicker_mean": float(np.mean([v["mean"] for v in per.values()])),
            "smoothing_ms": _stats(node.geometry.smooth.ms),
            "postprocess_ms": _stage_ms(done, "decoded", "postprocessed"),
            "geometry_ms": _stage_ms(done, "postprocessed", "geometry"),
        }
    return out


def sweep_wire_truth(
    doc: dict[str, Any], size: int, shift_mm: float = 120.0
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(tip, tail, width) per frame: the sweep's K-wire moved ``shift_mm`` towards the isocentre
    (where it is recorded it lies outside the field of view), projected by each frame's camera."""
    part = doc["tools"][0]["parts"][0]
    p0, p1 = np.asarray(part["p0"], float), np.asarray(part["p1"], float)
    iso = np.asarray(doc["cameras"][0]["isocenter"], float)
    move = (iso - p0) / np.linalg.norm(iso - p0) * shift_mm
    p0, p1 = p0 + move, p1 + move
    out = []
    for cam in doc["cameras"]:
        s = size / cam["width"]
        K = np.array(cam["intrinsic"]) * np.array([[s], [s], [1.0]])
        E = np.array(cam["extrinsic"])[:3]
        P = K @ E

        def project(p: np.ndarray, P: np.ndarray = P) -> np.ndarray:
            u = P @ np.r_[p, 1.0]
            return u[:2] / u[2] - 0.5  # the camera's pixel centres are at integer + 0.5

        depth = float((E @ np.r_[(p0 + p1) / 2, 1.0])[2])
        out.append((project(p0), project(p1), 2 * part["r"] * K[0, 0] / depth))
    return out


def _wire_logits(tip: np.ndarray, tail: np.ndarray, width: float, L: int, scale: float) -> np.ndarray:
    """Signed distance to the wire's outline, a band with flat ends (source pixels, positive
    inside), at low-res pixel centres: one logit per low-res pixel."""
    c = (np.arange(L, dtype=np.float64) + 0.5) * scale - 0.5
    X, Y = np.meshgrid(c, c)
    d = tail - tip
    length = float(np.hypot(*d))
    u = d / length
    along = (X - tip[0]) * u[0] + (Y - tip[1]) * u[1]
    across = np.abs(-(X - tip[0]) * u[1] + (Y - tip[1]) * u[0])
    return np.minimum(width / 2 - across, np.minimum(along, length - along)) / scale


def tip_jitter(
    weights: Sequence[float], noise: float = 0.3, size: int = 1024, limit: int | None = None
) -> dict[str, Any]:
    """Tip error, frame-to-frame jitter and lag of a K-wire over the sweep, per smoothing weight.

    Noise model: independent per frame, N(0, noise) logits per low-res pixel, spatially smoothed
    (Gaussian, sigma one low-res pixel) and rescaled to that standard deviation; the logit slope
    is one per low-res pixel, so ``noise`` 0.3 moves an edge by about 0.3 low-res pixels (1.2 px
    at 1024²). The tip is the largest instance's: where noise breaks the wire, a piece's end.
    """
    frames, doc = demo_sweep()
    truth = sweep_wire_truth(doc, size)[:limit]
    L = 256
    scale = size / L
    rng = np.random.default_rng(18)
    noises = []
    for _ in truth:
        n = cv2.GaussianBlur(rng.standard_normal((L, L)).astype(np.float32), (0, 0), 1.0)
        noises.append(n * (noise / float(n.std())))
    clean = [_wire_logits(tip, tail, w, L, scale) for tip, tail, w in truth]
    out: dict[str, Any] = {"frames": len(truth), "noise_logit_sd": noise, "low_res": L, "by_weight": {}}
    for w in weights:
        stage = GeometryStage(GeometryOptions(smoothing=w), default_linear_tools())
        errs, tips, smooth_ms = [], [], []
        for i, ((tip, _tail, _w), logit) in enumerate(zip(truth, clean)):
            low = torch.tensor((logit + noises[i])[None], dtype=torch.float32)
            stage.begin_frame(frames[min(i, len(frames) - 1)], {})
            t0 = time.perf_counter_ns()
            low, _ = stage.smooth(["K-wire"], low, torch.ones(1))
            smooth_ms.append((time.perf_counter_ns() - t0) / 1e6)
            masks, rois = upsample(low, (size, size), size)
            g = stage.process([NS(id="K-wire", text="K-wire")], masks, [True], 1, (size, size), {}, rois)[0]
            wire = g.instances[0] if g.instances else None  # the largest part; noise makes small ones
            got = np.array(wire.tip) if wire is not None and wire.tip is not None else None
            tips.append(got)
            errs.append(None if got is None else got - tip)
        ok = [e for e in errs if e is not None]
        err = np.array(ok) if ok else np.zeros((0, 2))
        motion = np.diff(np.array([t[0] for t in truth]), axis=0)  # the true tip's step per frame
        # lag: the error's component along the tip's motion (negative: the estimate trails)
        lag = [
            float(e @ m / np.linalg.norm(m))
            for e, m in zip(errs[1:], motion)
            if e is not None and np.linalg.norm(m) > 0.2
        ]
        steps = [b - a for a, b in itertools.pairwise(errs) if a is not None and b is not None]
        out["by_weight"][str(w)] = {
            "tips_found": len(ok),
            "tip_error_px": _stats(np.hypot(*err.T)) if len(err) else {},
            "within_5px": float(np.mean(np.hypot(*err.T) <= 5)) if len(err) else 0.0,
            "jitter_px": float(np.sqrt(np.mean([s @ s for s in steps]))) if steps else None,
            "lag_px": float(np.mean(lag)) if lag else None,
            "smoothing_ms": _stats(smooth_ms),
        }
    out["tip_motion_px_per_frame"] = float(np.mean(np.hypot(*np.diff([t[0] for t in truth], axis=0).T)))
    return out


# --------------------------------------------------------------------------- transport


def transport(k: int = 10, size: int = 1024, n: int = 40, encoding: str = "u8") -> dict[str, Any]:
    """Bytes and publish -> decoded time for full and geometry-only messages of K prompts."""
    from bridge.protocol import MaskMessage, PromptResult

    from ..service.publish import MaskPublisher

    names, low = synthetic_anatomy(k, 256)
    masks, rois = upsample(low, (size, size), 256)
    stage = GeometryStage(GeometryOptions(), default_linear_tools())
    stage.begin_frame(np.zeros((size, size), np.uint8), {})
    geoms = stage.process([NS(id=t, text=t) for t in names], masks, [True] * k, 1, (size, size), {}, rois)
    out: dict[str, Any] = {"prompts": k, "size": size, "encoding": encoding, "messages": n}
    work = Path(tempfile.mkdtemp(prefix="fsam-geo-"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        for kind in ("full", "geometry"):
            pub = MaskPublisher(
                ["tcp://127.0.0.1:*"] if kind == "full" else [],
                geometry_endpoints=["tcp://127.0.0.1:*"] if kind == "geometry" else [],
            )
            ep = (pub.endpoints or pub.geometry_endpoints)[0]
            prefix = str(work / kind)
            proc = subprocess.Popen(
                [sys.executable, "-m", "fluorosam_rt.bench.subscriber", ep, prefix, "--rcvhwm", "1000"],
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
            sent: dict[int, int] = {}
            try:
                proc.stdout.readline()  # {"event": "ready"}
                time.sleep(0.3)
                for i in range(n):
                    msg = MaskMessage(
                        "bench", i, 0, {"source": time.time_ns()}, {}, {}, (size, size), 1, encoding,
                        [PromptResult(t, t, 0.9, True, m, g) for t, m, g in zip(names, masks, geoms)],
                    )  # fmt: skip
                    sent[i] = time.monotonic_ns()
                    msg.timestamps_ns["published"] = time.time_ns()
                    pub.publish(msg)
                    time.sleep(0.05)
                time.sleep(0.5)
            finally:
                proc.terminate()
                proc.wait(30)
                described = pub.describe()[kind]
                pub.close()
            rows = np.load(prefix + ".npz")["rows"]
            ms = [(int(r[2]) - sent[int(r[0])]) / 1e6 for r in rows if int(r[0]) in sent]
            out[kind] = {
                "bytes_per_message": described["bytes_sent"] / max(1, described["messages"]),
                "received": len(ms),
                "transport_ms": _stats(ms),
            }
        out["bytes_ratio"] = out["full"]["bytes_per_message"] / out["geometry"]["bytes_per_message"]
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- all of it


def run_geometry_bench(bundle: Any, frames: Sequence[np.ndarray], texts: Sequence[str], quick: bool,
                       progress: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Everything above; ``frames`` are the benchmark's (1024² uint16), ``texts`` its K prompts."""
    repeats = 3 if quick else 10
    size = frames[0].shape[0]
    result: dict[str, Any] = {}
    progress(f"geometry: cost for {len(texts)} prompts on the model's masks at {size}² ...")
    mm = model_mask_frames(bundle, frames[: 8 if quick else 16], texts)
    result["cost_model_masks"] = time_stage(texts, mm, frames[0].shape[:2], repeats)
    progress("geometry: the same, every pixel traced (trace_stride 1, the stage before the grid) ...")
    result["cost_model_masks_stride1"] = time_stage(texts, mm, frames[0].shape[:2], repeats, trace_stride=1)
    progress("geometry: the same, masks published at half resolution (publish.downsample 2) ...")
    mm2 = model_mask_frames(bundle, frames[: 8 if quick else 16], texts, downsample=2)
    result["cost_model_masks_d2"] = time_stage(texts, mm2, frames[0].shape[:2], repeats, downsample=2)
    progress("geometry: cost on synthetic anatomy with ribs and a K-wire ...")
    synth = []
    for s in range(8):  # the structures drift 1 low-res px per frame: tracking has work to do
        names, low = synthetic_anatomy(len(texts), 256, shift=float(s))
        synth.append(upsample(low, (1024, 1024), 256))
    result["cost_synthetic"] = time_stage(names, synth, (1024, 1024), repeats)
    progress("geometry: flicker on the demo sweep, smoothing off and on ...")
    weights = (0.0, 0.5)
    result["flicker_anatomy"] = anatomy_flicker(bundle, weights)
    result["tip_jitter"] = tip_jitter(weights)
    progress("geometry: full vs geometry-only messages over TCP ...")
    result["transport"] = transport(k=len(texts), size=size, n=20 if quick else 60)
    return result
