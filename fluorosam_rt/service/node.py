"""The streaming node: frames in, one mask per active prompt out, newest frame first.

Read top to bottom, a frame goes through:

    receive -> preprocess -> encode image -> decode all prompts (one batch) -> postprocess
            -> geometry (outlines, instances, tool tips and axes, tracked ids) -> publish

Three threads carry it: the source's (receive), inference (preprocess .. geometry) and
publishing, joined by one-slot hand-offs where a newer frame replaces an older one. So when the
model is slower than the C-arm the backlog can never exceed one frame per hand-off, old frames
are dropped and counted with a reason, and latency does not grow with time.

Accounting: every frame that is received is, at any moment, in flight or published or dropped
with a reason; after ``stop`` nothing is in flight, so received == published + sum(dropped).
A bad frame or a failing engine drops that frame and the node carries on; the engine itself
(``engines.chain.EngineChain``) counts its failures and moves to the next configured back end
after too many in a row.

The inference stage is the predictor's stages called in a row (preprocess, encode, decode, select,
mask_planes); the node adds only what is the stream's own (smoothing, geometry, the image) and
stamps the time between the calls.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from bridge.prompt_geometry import PromptGeometry, Scene
from bridge.protocol import MaskMessage, PromptResult, mask_shape
from engines.chain import EngineChain, EngineRunError, NonFiniteOutput

from ..geometry_stage import GeometryStage, frame_spacing, support_rois
from ..overlay import to_display_u8
from ..predictor import Predictor
from ..prompts import Prompt
from ..sources.base import PATIENT_KEYS, Frame, Source
from .flow import FlowRing

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- hand-offs and counters


class LatestSlot:
    """A one-item hand-off: put() replaces what is waiting and returns the replaced item."""

    def __init__(self) -> None:
        self._item: Any = None
        self._cond = threading.Condition()

    def put(self, item: Any) -> Any:
        with self._cond:
            old, self._item = self._item, item
            self._cond.notify()
            return old

    def get(self, timeout: float) -> Any:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item


class Accounting:
    """received = published + dropped[reason] + in flight, under one lock so snapshots add up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.published = 0
        self.dropped: Counter[str] = Counter()

    def receive(self) -> None:
        with self._lock:
            self.received += 1

    def publish(self) -> None:
        with self._lock:
            self.published += 1

    def drop(self, reason: str) -> None:
        with self._lock:
            self.dropped[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            dropped = dict(self.dropped)
            in_flight = self.received - self.published - sum(dropped.values())
            return {
                "received": self.received,
                "published": self.published,
                "dropped": dropped,
                "dropped_total": sum(dropped.values()),
                "in_flight": in_flight,
            }


# --------------------------------------------------------------------------- the node


@dataclass
class Processed:
    """A frame after inference, waiting to be published."""

    frame: Frame
    t: dict[str, int]
    prompts: tuple[Prompt, ...]
    masks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    present: list[bool] = field(default_factory=list)
    out_shape: tuple[int, int] = (0, 0)
    image: np.ndarray | None = None
    rois: list[tuple[int, int, int, int] | None] | None = None  # where each mask can have pixels
    geometry: list[PromptGeometry] = field(default_factory=list)
    scene: Scene | None = None


class FrameDropped(Exception):
    """Raised inside the inference stage to drop the current frame with a reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class Node:
    """The streaming pipeline: frames in from a source, one message per frame out to a publisher.

    ``predictor``: runs the frame path (its engine owns the back-end fallback). ``source``: where
    frames come from; the node starts and stops it. ``publisher``: where messages go
    (``MaskPublisher``, or anything with ``publish`` and ``close``). ``stream``: the topic name.
    ``downsample``: masks are published at 1/N of the frame's size; ``mask_encoding``: how mask
    planes are packed (protocol). ``include_image``: send the frame (display 8-bit) with the masks.
    ``max_prompts``: the most active prompts. ``stats_window``: frames the latency statistics
    cover. ``model_name``: reported in every message. ``geometry``: the outlines/instances/tools
    stage (default: the vocabulary's linear tools, default options).
    """

    def __init__(
        self,
        predictor: Predictor,
        source: Source,
        publisher: Any,
        *,
        stream: str = "carm0",
        downsample: int = 1,
        mask_encoding: str = "u8",
        include_image: bool = False,
        max_prompts: int = 16,
        stats_window: int = 1000,
        model_name: str = "",
        geometry: GeometryStage | None = None,
    ) -> None:
        from ..active_prompts import ActivePrompts
        from ..linear_tools import default_linear_tools

        self.predictor = predictor
        self.source = source
        self.publisher = publisher
        self.stream = stream
        self.downsample = downsample
        self.mask_encoding = mask_encoding
        self.include_image = include_image
        self.model_name = model_name
        self.prompts = ActivePrompts(predictor.add_prompts, max_prompts=max_prompts)
        self.geometry = (
            geometry if geometry is not None else GeometryStage(linear_tools=default_linear_tools())
        )
        self.accounting = Accounting()
        # Flow tracking: the newest frames' stage stamps in a preallocated ring; ``latency`` is
        # the name status/stats readers have always used.
        self.flow = FlowRing(max(4096, stats_window), window=stats_window)
        self.latency = self.flow
        self.last_error = ""
        self._in = LatestSlot()
        self._out = LatestSlot()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._started_at = time.monotonic()
        for name, target in (("node-infer", self._infer_loop), ("node-publish", self._publish_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.source.start(self.receive)

    def request_stop(self) -> None:
        """Ask run() to return (control 'shutdown', a signal); safe from any thread."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def idle(self) -> bool:
        return self.accounting.snapshot()["in_flight"] == 0

    def run(self, until_source_finished: bool = True, timeout: float | None = None) -> None:
        """Block until stopped, or until a finite source has ended and its last frame is out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stop.wait(0.05):
            if until_source_finished and self.source.finished.is_set() and self.idle():
                break
            if deadline is not None and time.monotonic() > deadline:
                break

    def stop(self, drain_timeout: float = 5.0) -> dict[str, Any]:
        """Stop the source, let in-flight frames finish (or count them), close the stream."""
        if self._stopped:
            return self.accounting.snapshot()
        self.source.stop()
        deadline = time.monotonic() + drain_timeout
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=drain_timeout)
        for slot in (self._in, self._out):
            if slot.get(0) is not None:
                self.accounting.drop("shutdown")
        self.publisher.close()
        self._stopped = True
        return self.accounting.snapshot()

    # -- stage 1: receive (source thread) ---------------------------------------------------

    def receive(self, frame: Frame) -> None:
        frame.received_ns = time.time_ns()
        self.accounting.receive()
        if self._stop.is_set():
            self.accounting.drop("shutdown")
            return
        if self._in.put(frame) is not None:
            self.accounting.drop("superseded")  # latest frame wins: the waiting one is stale

    # -- stages 2-6: inference thread ---------------------------------------------------------

    def _infer_loop(self) -> None:
        while not self._stop.is_set():
            frame = self._in.get(timeout=0.1)
            if frame is None:
                continue
            t = {"source": frame.source_ts_ns, "received": frame.received_ns, "dequeued": time.time_ns()}
            try:
                done = self._infer(frame, t)
            except FrameDropped as exc:
                self.accounting.drop(exc.reason)
                continue
            except Exception as exc:  # never let one frame take the node down
                log.exception("unexpected error on frame %d", frame.frame_id)
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.accounting.drop("internal_error")
                continue
            if self._out.put(done) is not None:
                self.accounting.drop("superseded_at_publish")

    def _infer(self, frame: Frame, t: dict[str, int]) -> Processed:
        prompts = self.prompts.snapshot()
        p = self.predictor
        h, w = frame.pixels.shape[:2]
        out_shape = mask_shape((h, w), self.downsample)
        done = Processed(frame=frame, t=t, prompts=prompts, out_shape=out_shape)

        try:
            x, info = p.preprocess(frame.pixels)
        except (ValueError, TypeError, cv2.error) as exc:
            self.last_error = f"bad frame {frame.frame_id}: {exc}"
            raise FrameDropped("bad_frame", str(exc)) from exc
        t["preprocessed"] = time.time_ns()

        # encode and decode (skipped when nothing is asked for: the frame is still published)
        try:
            if prompts:
                emb = p.encode(x)
            t["encoded"] = time.time_ns()
            if prompts:
                low, iou = p.decode(emb, info, prompts)
            t["decoded"] = time.time_ns()
        except NonFiniteOutput as exc:
            self.last_error = str(exc)
            raise FrameDropped("nonfinite_output", str(exc)) from exc
        except EngineRunError as exc:
            self.last_error = str(exc)
            raise FrameDropped("engine_error", str(exc)) from exc

        # postprocess: scene-cut check, best of the multimask outputs, optional causal smoothing,
        # presence gate, threshold at output size
        done.scene = self.geometry.begin_frame(frame.pixels, frame.meta)
        if prompts:
            chosen, scores = p.select(low, iou)
            chosen, scores = self.geometry.smooth([q.id for q in prompts], chosen, scores)
            present = p.present(scores)
            masks = p.mask_planes(chosen, info, out_shape, present)  # uint8 0/1; absent: zeros
            done.rois = support_rois(chosen, p.mask_threshold, p.engine.img_size, info.resized_hw, out_shape)
            for i in range(len(prompts)):
                done.masks.append(masks[i])
                done.scores.append(float(scores[i]))
                done.present.append(present[i])
        if self.include_image:
            img = to_display_u8(frame.pixels)
            done.image = (
                cv2.resize(img, out_shape[::-1], interpolation=cv2.INTER_AREA) if self.downsample > 1 else img
            )
        t["postprocessed"] = time.time_ns()

        # geometry: outlines, instances, tool tips and axes, ids tracked across frames
        done.geometry = self.geometry.process(
            prompts, done.masks, done.present, self.downsample, (h, w), frame.meta, done.rois
        )
        t["geometry"] = time.time_ns()
        return done

    # -- stage 6: publish thread ------------------------------------------------------------

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            done = self._out.get(timeout=0.1)
            if done is None:
                continue
            try:
                msg = self._message(done)
                done.t["published"] = msg.timestamps_ns["published"] = time.time_ns()
                self.publisher.publish(msg)
            except Exception as exc:
                log.exception("cannot publish frame %d", done.frame.frame_id)
                self.last_error = f"publish: {type(exc).__name__}: {exc}"
                self.accounting.drop("publish_error")
                continue
            self.accounting.publish()
            self.flow.record(done.frame.frame_id, done.t)

    def _message(self, done: Processed) -> MaskMessage:
        meta = done.frame.meta  # built once by the source (sources.base.frame_meta), taken as is
        return MaskMessage(
            stream=self.stream,
            frame_id=done.frame.frame_id,
            seq=0,
            timestamps_ns=dict(done.t),
            source=meta.source,
            geometry=meta.geometry,
            source_shape=tuple(done.frame.pixels.shape[:2]),
            downsample=self.downsample,
            encoding=self.mask_encoding,
            prompts=[
                PromptResult(id=p.id, text=p.text, score=s, present=pr, mask=m, geometry=g)
                for p, s, pr, m, g in zip(done.prompts, done.scores, done.present, done.masks, done.geometry)
            ],
            image=done.image,
            model=self.model_name,
            spacing=frame_spacing(meta.geometry),
            scene=done.scene,
        )

    # -- what control reports ---------------------------------------------------------------

    @property
    def engine(self) -> EngineChain:
        """The predictor's engine: it owns its fallback chain and failure counts."""
        return self.predictor.engine

    def status(self) -> dict[str, Any]:
        acc = self.accounting.snapshot()
        return {
            "stream": self.stream,
            "model": self.model_name,
            "engine": self.engine.describe(),
            "engine_switches": list(self.engine.switches),
            "fps": round(self.latency.fps(), 3),
            "uptime_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0,
            "received": acc["received"],
            "published": acc["published"],
            "dropped": acc["dropped"],
            "in_flight": acc["in_flight"],
            "prompts": [prompt_dict(p) for p in self.prompts.snapshot()],
            "source": _loggable(self.source.describe()),
            "publish": {
                "endpoints": list(getattr(self.publisher, "endpoints", [])),
                **(self.publisher.describe() if hasattr(self.publisher, "describe") else {}),
            },
            "last_error": self.last_error,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.accounting.snapshot(),
            "fps": round(self.latency.fps(), 3),
            "latency": self.latency.summary(),
            "flow": {
                "recorded": self.flow.count,
                "window": self.flow.window,
                "clock_steps": self.flow.clock_steps,
            },
            "geometry": self.geometry.times.summary(),
            "text_encodes": self.predictor.cache.encode_count,
            "image_encodes": self.predictor.image_encode_count,
            "consecutive_failures": self.engine.consecutive_failures,
        }


def prompt_dict(p: Prompt) -> dict[str, Any]:
    return {"id": p.id, "text": p.text, "points": [list(x) for x in p.points], "labels": list(p.labels)}


def _loggable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in PATIENT_KEYS}


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan
