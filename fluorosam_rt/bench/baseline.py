"""The naive baseline: what a user of the official code does per frame, timed on the same frames.

For every frame: preprocess, encode the image, and for every prompt encode its text with the
text encoder, decode it alone, pick the best of the multimask outputs, upsample it to the frame
and copy the mask out. PyTorch eager, fp32, no prompt cache, no batching across prompts, no
sockets. The image is encoded once per frame, not once per prompt: a generous baseline, so the
ratio to the node is not inflated by a strawman.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from ..model.sam import FluoroSAM
from ..preprocess import preprocessor_for
from ..service.flow import describe_ms
from ..text.base import TextEncoder

T = TypeVar("T")


class NaiveBaseline:
    """One frame -> one boolean mask per prompt, the slow obvious way."""

    def __init__(self, model: FluoroSAM, text_encoder: TextEncoder, mask_threshold: float = 0.0) -> None:
        self.model = model.eval()
        self.text_encoder = text_encoder
        self.preprocessor = preprocessor_for(model.cfg)
        self.mask_threshold = mask_threshold

    @torch.no_grad()
    def frame(self, pixels: np.ndarray, texts: Sequence[str]) -> list[np.ndarray]:
        x, info = self.preprocessor(pixels)
        emb = self.model.encode_image(x.unsqueeze(0))
        s = self.model.img_size
        (rh, rw), (h, w) = info.resized_hw, info.original_hw
        masks = []
        for text in texts:
            feats = self.text_encoder.encode([text])  # every frame, every prompt: no cache
            tokens = self.model.text_tokens(feats)
            low, iou = self.model.decode(emb, tokens)
            best = int(iou[0].argmax())
            up = F.interpolate(low[:, best : best + 1], (s, s), mode="bilinear", align_corners=False)
            up = F.interpolate(up[..., :rh, :rw], (h, w), mode="bilinear", align_corners=False)
            masks.append((up[0, 0] > self.mask_threshold).numpy().copy())
        return masks


def on_worker_thread(fn: Callable[[], T]) -> T:
    """Run fn on a fresh thread and return its result (or raise its exception).

    The node runs inference on a worker thread, and on a busy machine where the intra-op thread
    pool runs makes a large difference (the main thread's pool spins much worse under
    oversubscription); the baseline and the floor run where the node runs, so the comparison
    is like for like.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="bench-worker")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def time_baseline(
    baseline: NaiveBaseline,
    frames: Sequence[np.ndarray],
    texts: Sequence[str],
    n_frames: int,
    warmup: int = 1,
    rate: float = 0.0,
) -> dict[str, float]:
    """Per-frame latency over ``n_frames`` frames (cycling), after ``warmup`` frames.

    ``rate`` > 0 paces the loop like the node's source: it sleeps until the next frame is due,
    so the baseline pays the same wake-up costs as the node at that rate. A frame that is
    already due starts at once and is timed from its start (a naive loop that falls behind
    would queue without bound; the latency of the work itself is what is compared).
    ``sustainable_fps`` is how many frames a second the baseline could do back to back.
    """

    def loop() -> tuple[list[float], float]:
        for i in range(warmup):
            baseline.frame(frames[i % len(frames)], texts)
        ms = []
        period = 1.0 / rate if rate else 0.0
        due = time.perf_counter()
        busy = 0.0
        for i in range(n_frames):
            if period:
                due += period
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    due = time.perf_counter()
            t0 = time.perf_counter()
            baseline.frame(frames[i % len(frames)], texts)
            dt = time.perf_counter() - t0
            busy += dt
            ms.append(dt * 1e3)
        return ms, busy

    ms, busy = on_worker_thread(loop)
    return {**describe_ms(np.asarray(ms)), "rate": rate, "sustainable_fps": len(ms) / busy if busy else 0.0}
