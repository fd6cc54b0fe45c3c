"""Flow tracking: every published frame's stage timestamps in a fixed ring, summarised live.

Modelled on data-flow tracking in streaming frameworks: each frame is timed from the root
(the source) to the leaf (publish; the subscriber's receive is joined on by the benchmark), and
the live summary is percentiles per stage and end to end. Three properties matter in a node
that runs for hours next to a patient:

* **Bounded and allocation-free per frame.** Rows live in preallocated int64 arrays; recording
  a frame writes a handful of integers into the next row and allocates nothing that outlives the
  call, so a 10-hour run holds exactly as much memory as a 10-second one.
* **One clock the benchmark can share.** Rows hold CLOCK_MONOTONIC nanoseconds, which every
  process on the host reads alike, so a subscriber in another process can stamp its receive
  time with ``time.monotonic_ns()`` and subtract. The node stamps stages with the wall clock
  (the wire protocol carries wall-clock times); ``record`` converts them with the current
  offset between the two clocks. Both clocks run at the same NTP-disciplined rate and differ
  only by steps of the wall clock, so the conversion is exact unless the wall clock is stepped
  while a frame is in flight; such a step changes the offset, is counted in ``clock_steps``,
  and affects only that frame.
* **Summaries off the frame path.** Percentiles are computed when someone asks (control
  ``stats``, Prometheus scrape), on a copy taken under a short lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

# STAGES, the stage stamps in pipeline order (the keys of the node's per-frame timestamp map), are
# defined once, in the wire protocol the subscribers read: bridge imports nothing of the project,
# the node may import bridge's protocol (docs/architecture.md).
from bridge.protocol import STAGES

CLOCK = "CLOCK_MONOTONIC"
# Consecutive segments: their durations add up exactly to source -> published.
SEGMENTS = (
    ("ingest", "source", "received"),
    ("queue", "received", "dequeued"),
    ("preprocess", "dequeued", "preprocessed"),
    ("encode", "preprocessed", "encoded"),
    ("decode", "encoded", "decoded"),
    ("postprocess", "decoded", "postprocessed"),
    ("geometry", "postprocessed", "geometry"),
    ("publish_wait", "geometry", "published"),
)
SPANS = (
    ("end_to_end", "received", "published"),
    ("source_to_published", "source", "published"),
)
QUANTILES = (50, 95, 99)
MISSING = np.iinfo(np.int64).min  # a stage this frame never passed (e.g. no encode without prompts)
_STEP_NS = 1_000_000  # an offset change above 1 ms is a wall-clock step, not jitter


def clock_offset_ns() -> int:
    """CLOCK_MONOTONIC minus CLOCK_REALTIME, now (constant between wall-clock steps)."""
    return time.monotonic_ns() - time.time_ns()


class FlowRing:
    """The last ``capacity`` published frames' stage stamps (monotonic ns), oldest overwritten."""

    def __init__(self, capacity: int = 4096, window: int | None = None, stages: tuple[str, ...] = STAGES):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = int(capacity)
        self.window = min(self.capacity, int(window or capacity))
        self.stages = tuple(stages)
        self._index = {s: j for j, s in enumerate(self.stages)}
        self._ns = np.full((self.capacity, len(self.stages)), MISSING, dtype=np.int64)
        self._frame = np.full(self.capacity, -1, dtype=np.int64)
        self._count = 0  # frames recorded since start; row = count % capacity
        self._last_offset = 0
        self.clock_steps = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def record(self, frame_id: int, wall_ns: Mapping[str, int], offset_ns: int | None = None) -> None:
        """Store one published frame's wall-clock stage stamps as monotonic times.

        Called on the publish thread once per frame: writes into the next preallocated row and
        allocates nothing that outlives the call.
        """
        off = clock_offset_ns() if offset_ns is None else offset_ns
        with self._lock:
            if self._count and abs(off - self._last_offset) > _STEP_NS:
                self.clock_steps += 1
            self._last_offset = off
            row = self._count % self.capacity
            ns = self._ns
            for stage in self.stages:
                v = wall_ns.get(stage)
                ns[row, self._index[stage]] = MISSING if v is None else v + off
            self._frame[row] = frame_id
            self._count += 1

    # -- reading ----------------------------------------------------------------------------

    def rows(self, since: int = 0, last: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
        """(first record index, frame ids [n], stamps [n, stages]) in record order, copied.

        ``since`` is a record index (a reader that polls passes the previous call's first index
        plus n); rows already overwritten are gone and silently skipped. ``last`` keeps only the
        newest rows.
        """
        with self._lock:
            count = self._count
            first = max(since, count - self.capacity, 0)
            if last is not None:
                first = max(first, count - last)
            idx = np.arange(first, count) % self.capacity if count > first else np.arange(0)
            return first, self._frame[idx].copy(), self._ns[idx].copy()

    def durations_ms(self, ns: np.ndarray, a: str, b: str) -> np.ndarray:
        """b - a in ms for rows where both stages were stamped."""
        x, y = ns[:, self._index[a]], ns[:, self._index[b]]
        ok = (x != MISSING) & (y != MISSING)
        return (y[ok] - x[ok]) / 1e6

    def summary(self, last: int | None = None) -> dict[str, dict[str, float]]:
        """p50/p95/p99/max/mean per segment and span over the newest ``window`` frames."""
        _, _, ns = self.rows(last=last or self.window)
        out: dict[str, dict[str, float]] = {}
        for name, a, b in (*SEGMENTS, *SPANS):
            ms = self.durations_ms(ns, a, b)
            if ms.size:
                out[name] = describe_ms(ms)
        return out

    def fps(self, horizon_s: float = 2.0) -> float:
        """Published frames per second over the last ``horizon_s`` seconds."""
        _, _, ns = self.rows(last=min(self.capacity, 1024))
        pub = ns[:, self._index["published"]]
        pub = pub[pub != MISSING]
        recent = pub[pub >= time.monotonic_ns() - int(horizon_s * 1e9)]
        if recent.size < 2:
            return 0.0
        span = (recent.max() - recent.min()) / 1e9
        return float((recent.size - 1) / span) if span > 0 else 0.0

    def export(self, since: int = 0, limit: int = 4096) -> dict[str, Any]:
        """Raw rows for a client (control ``flow``): JSON-safe, at most ``limit`` rows."""
        first, frames, ns = self.rows(since=since)
        if frames.size > limit:
            first, frames, ns = first + frames.size - limit, frames[-limit:], ns[-limit:]
        return {
            "clock": CLOCK,
            "stages": list(self.stages),
            "first": int(first),
            "next": int(first + frames.size),
            "count": int(self._count),
            "frame_id": frames.tolist(),
            "ns": [[None if v == MISSING else v for v in row] for row in ns.tolist()],
        }


def describe_ms(ms: np.ndarray) -> dict[str, float]:
    """The statistics every latency report in this project uses (linear-interpolated percentiles)."""
    ms = np.asarray(ms, dtype=np.float64)
    q = np.percentile(ms, QUANTILES)
    return {
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "max_ms": float(ms.max()),
        "mean_ms": float(ms.mean()),
        "n": int(ms.size),
    }


# --------------------------------------------------------------------------- Prometheus


def _metric_name(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


def prometheus_text(stats: Mapping[str, Any], stream: str = "") -> str:
    """Node stats -> Prometheus text exposition (summaries in seconds, counters as totals).

    Written by hand (a few lines) rather than with prometheus_client so the node keeps no extra
    dependency and no global registry: every scrape renders the current ring.
    """
    lab = f'stream="{stream}"' if stream else ""
    lines: list[str] = []

    def sample(name: str, value: float, extra: str = "") -> None:
        labels = ",".join(x for x in (lab, extra) if x)
        lines.append(f"{name}{{{labels}}} {value:.9g}" if labels else f"{name} {value:.9g}")

    lines += [
        "# HELP fluorosam_frames_total Frames by fate since the node started.",
        "# TYPE fluorosam_frames_total counter",
    ]
    sample("fluorosam_frames_total", stats.get("received", 0), 'fate="received"')
    sample("fluorosam_frames_total", stats.get("published", 0), 'fate="published"')
    for reason, n in sorted(stats.get("dropped", {}).items()):
        sample("fluorosam_frames_total", n, f'fate="dropped",reason="{_metric_name(reason)}"')
    lines += ["# HELP fluorosam_fps Published frames per second.", "# TYPE fluorosam_fps gauge"]
    sample("fluorosam_fps", float(stats.get("fps", 0.0)))
    lines += [
        "# HELP fluorosam_stage_seconds Per-stage latency over the node's flow-tracking window.",
        "# TYPE fluorosam_stage_seconds summary",
    ]
    for stage, s in sorted(stats.get("latency", {}).items()):
        st = f'stage="{_metric_name(stage)}"'
        for q in QUANTILES:
            sample("fluorosam_stage_seconds", s[f"p{q}_ms"] / 1e3, f'{st},quantile="{q / 100}"')
        sample("fluorosam_stage_seconds_max", s["max_ms"] / 1e3, st)
        sample("fluorosam_stage_seconds_sum", s["mean_ms"] * s["n"] / 1e3, st)
        sample("fluorosam_stage_seconds_count", s["n"], st)
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on a tiny standard-library HTTP server, on its own daemon thread."""

    def __init__(self, render: Callable[[], str], host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                try:
                    body = render().encode()
                except Exception as exc:  # a scrape must never take the node down
                    self.send_error(500, f"{type(exc).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line each
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="node-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
