"""``fluorosam-rt bench --faults``: a fast subscriber's latency with and without misbehaving peers.

Issue 9 asks that a subscriber that dies, one that reads one frame a second and one that
reconnects in a loop leave the node's latency for the others within 10 % of the baseline, and
that nothing leaks. This module measures it on the real node (same setup as the soak: replayed
stream at 15 fps, 3 prompts, onnxruntime where it loads) with the benchmark's own fast
subscriber process, in alternating phases of one run:

* **baseline**: the fast subscriber plus three healthy peers, each in its own process (the
  control group: the same number of peers as the fault phase, so the ratio measures the faults
  and not the cost of serving more subscribers; ``--faults-baseline-peers none`` leaves the fast
  subscriber alone instead);
* **faults**: the same fast subscriber plus three fault processes (fault_subscriber.py): ``slow``,
  ``reconnect`` and ``dying``, the last SIGKILLed halfway through the phase's window.

Rounds alternate the order (baseline, faults), (faults, baseline), ... so that a linear drift in
the machine's load weighs on both conditions equally over an even number of rounds. Each phase
starts its processes, waits ``settle_s`` (Python start-up of the fault processes is not the
node's doing, so it stays out of the window), measures for ``phase_s``, then stops them. The
fault processes are separate processes so they never hold the measuring process's GIL; their
CPU use is reported next to the latencies, since on a small machine they compete with the node
for cores.

Latencies are the bench's end to end (frame handed to the node -> masks decoded by the fast
subscriber, CLOCK_MONOTONIC joined by frame id); ratios are faults / baseline over all frames
of each condition pooled, and per round.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..service.flow import STAGES, describe_ms
from .fault_subscriber import CONTROL_KIND, KINDS
from .harness import (
    PROMPT_TEXTS,
    BenchError,
    BenchOptions,
    FlowLog,
    delta,
    join_cell,
    read_json_line,
    resolve_engines,
    start_group,
    stats,
    stop_group,
    subprocess_env,
)
from .procs import cpu_seconds, memory_mb, open_fds, thread_count

TARGET_RATIO = 1.10  # faults / baseline, p50 and p99: "within 10 % of the baseline"
FPS, PROMPTS = 15.0, 3
TOPIC = "bench"  # the node's stream name in start_group's settings


def phase_plan(rounds: int) -> list[tuple[int, str]]:
    """(round, kind) per phase: rounds alternate AB, BA, AB, ... (ABBA ordering)."""
    out: list[tuple[int, str]] = []
    for r in range(rounds):
        pair = ("baseline", "faults") if r % 2 == 0 else ("faults", "baseline")
        out += [(r, k) for k in pair]
    return out


def free_tcp_endpoint() -> str:
    """A loopback TCP endpoint on a port the kernel just handed out (tiny race, fine here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def node_snapshot(pid: int) -> dict[str, Any]:
    mem = memory_mb(pid)
    return {"rss_mb": mem["rss_mb"], "fds": open_fds(pid), "threads": thread_count(pid)}


# --------------------------------------------------------------------------- fault processes


class FaultProcs:
    """The extra subscribers of one phase (three faults, or three healthy peers), each in its own process."""

    def __init__(self, endpoint: str, folder: Path, tag: str, control: bool = False) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        kinds = [f"{CONTROL_KIND}{n + 1}" for n in range(len(KINDS))] if control else list(KINDS)
        self.outs = {k: folder / f"{tag}-{k}.json" for k in kinds}
        self.log = open(folder / f"{tag}-faults.log", "w")  # noqa: SIM115
        self.cpu_last: dict[str, float] = {}
        self.killed_at_s: float | None = None
        try:
            for kind in kinds:
                self.procs[kind] = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fluorosam_rt.bench.fault_subscriber",
                        CONTROL_KIND if control else kind,
                        endpoint,
                        str(self.outs[kind]),
                        "--topic",
                        TOPIC,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=self.log,
                    text=True,
                    env=subprocess_env(),
                )
            for kind, p in self.procs.items():
                read_json_line(p, 120, f"the {kind} fault subscriber (log {self.log.name})")
        except BaseException:
            self.stop()
            raise

    def cpu(self) -> float:
        """CPU seconds of all fault processes so far (the killed one: up to its last reading)."""
        for kind, p in self.procs.items():
            if p.poll() is None:
                with contextlib.suppress(OSError):  # it just exited
                    self.cpu_last[kind] = cpu_seconds(p.pid)
        return sum(self.cpu_last.values())

    def kill_dying(self, t_s: float) -> None:
        self.cpu()
        p = self.procs["dying"]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        self.killed_at_s = t_s

    def stop(self) -> dict[str, Any]:
        """SIGTERM the survivors, collect their counters; anything that hangs is killed."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        out: dict[str, Any] = {}
        for kind, p in self.procs.items():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
            try:
                counters = json.loads(self.outs[kind].read_text())
            except (OSError, ValueError):
                counters = {}
            out[kind] = {"exit_code": p.returncode, **counters}
        if "dying" in out:
            out["dying"]["killed_at_s"] = self.killed_at_s
        self.log.close()
        return out


# --------------------------------------------------------------------------- the run


def seq_gaps(frame_ids: np.ndarray, ring: np.ndarray, sub_rows: np.ndarray, t0: int, t1: int) -> int:
    """Messages missing between consecutive ones the subscriber got (jumps in the publisher's seq),
    over the frames that entered the node in [t0, t1)."""
    received = ring[:, STAGES.index("received")]
    fids = frame_ids[(received >= t0) & (received < t1)]
    if not sub_rows.size or not fids.size:
        return 0
    seq = np.sort(sub_rows[np.isin(sub_rows[:, 0], fids), 1])
    return int(np.clip(np.diff(seq) - 1, 0, None).sum()) if seq.size > 1 else 0


def run_faults(
    work: Path,
    opts: BenchOptions,
    frames_dir: Path,
    checkpoint: str | None,
    bundle: Any,
    progress: Any = print,
) -> dict[str, Any]:
    if opts.faults_rounds < 1 or opts.faults_phase_s <= 0 or opts.faults_settle_s < 0:
        raise BenchError("--faults-rounds must be >= 1, --faults-phase-s > 0 and --faults-settle-s >= 0")
    engines, _ = resolve_engines(
        BenchOptions(out_dir=opts.out_dir, engines=[opts.faults_engine or "onnxruntime"]), bundle.model
    )
    engine = engines[0] if engines else "torch"
    plan = phase_plan(opts.faults_rounds)
    per_phase = opts.faults_phase_s + 2 * opts.faults_settle_s + 150  # fault start-up, flow paging
    endpoint = free_tcp_endpoint() if opts.faults_transport == "tcp" else None
    g = start_group(
        work,
        "faults",
        opts,
        engine,
        FPS,
        frames_dir,
        checkpoint,
        PROMPT_TEXTS[:PROMPTS],
        300 + opts.warmup_s + per_phase * len(plan),
        publish_endpoint=endpoint,
    )
    folder = Path(g.sub_out).parent
    windows: list[dict[str, Any]] = []
    flow = FlowLog(g.control)
    faults: FaultProcs | None = None
    try:
        time.sleep(opts.warmup_s)
        before = node_snapshot(g.node.pid)
        for i, (rnd, kind) in enumerate(plan):
            progress(
                f"  faults: phase {i + 1}/{len(plan)} (round {rnd + 1}) {kind:<8} "
                f"{opts.faults_phase_s:g} s  node RSS {memory_mb(g.node.pid)['rss_mb']:.0f} MiB"
            )
            if kind == "faults" or opts.faults_baseline_peers == "healthy":
                faults = FaultProcs(g.masks, folder, f"phase{i}", control=kind == "baseline")
            time.sleep(opts.faults_settle_s)
            s0, c0, cs0 = stats(g.control), cpu_seconds(g.node.pid), cpu_seconds(g.sub.pid)
            cf0 = faults.cpu() if faults else 0.0
            t0, w0 = time.monotonic_ns(), time.monotonic()
            if kind == "faults" and faults:
                time.sleep(opts.faults_phase_s / 2)
                faults.kill_dying(time.monotonic() - w0)
                time.sleep(max(0.0, opts.faults_phase_s - (time.monotonic() - w0)))
            else:
                time.sleep(opts.faults_phase_s)
            t1, w1 = time.monotonic_ns(), time.monotonic()
            s1, c1, cs1 = stats(g.control), cpu_seconds(g.node.pid), cpu_seconds(g.sub.pid)
            cf1 = faults.cpu() if faults else 0.0
            during = node_snapshot(g.node.pid)
            fault_counters = faults.stop() if faults else {}
            faults = None
            flow.fetch()
            wall = w1 - w0
            windows.append(
                {
                    "phase": i,
                    "round": rnd,
                    "kind": kind,
                    "window_s": wall,
                    "t0": t0,
                    "t1": t1,
                    **delta(s0, s1),
                    "cpu_pct_node": 100 * (c1 - c0) / wall,
                    "cpu_pct_fast_subscriber": 100 * (cs1 - cs0) / wall,
                    "cpu_pct_fault_subscribers": 100 * (cf1 - cf0) / wall,
                    "node_at_window_end": during,
                    "fault_subscribers": fault_counters,
                }
            )
        time.sleep(max(opts.faults_settle_s, 0.5))  # the node closes the last peers' pipes
        after = node_snapshot(g.node.pid)
    finally:
        if faults is not None:
            faults.stop()
        final, sub_rows, counters = stop_group(g)
    frame_ids, ring = flow.arrays()
    phases = []
    for w in windows:
        t0, t1 = w.pop("t0"), w.pop("t1")
        j = join_cell(frame_ids, ring, sub_rows, t0, t1)
        w["throughput_fps"] = w["published"] / w["window_s"]
        w["published_in_window"] = j["node_published_in_window"]  # frames that entered in it
        w["received_by_fast_subscriber"] = j["joined"]
        w["not_received_by_fast_subscriber"] = j["node_published_in_window"] - j["joined"]
        w["seq_gaps"] = seq_gaps(frame_ids, ring, sub_rows, t0, t1)
        w.update({k: j[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms") if k in j})
        if "publish_wait" in j.get("stages", {}):
            w["publish_wait_p99_ms"] = j["stages"]["publish_wait"]["p99_ms"]
        w["samples_ms"] = j.get("samples_ms", [])
        phases.append(w)
    return {
        "engine": engine,
        "fps": FPS,
        "prompts": PROMPTS,
        "transport": opts.faults_transport,
        "phase_s": opts.faults_phase_s,
        "settle_s": opts.faults_settle_s,
        "rounds": opts.faults_rounds,
        "baseline_peers": opts.faults_baseline_peers,
        "order": "".join("A" if k == "baseline" else "B" for _, k in plan),
        "phases": phases,
        "node_before": before,
        "node_after": after,
        "final": {**final, "subscriber": counters},
        "summary": faults_summary(phases, before, after),
    }


def faults_summary(
    phases: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    """Pooled latency per condition, faults / baseline ratios (pooled and per round), and leaks."""
    out: dict[str, Any] = {"target_ratio": TARGET_RATIO}
    for kind in ("baseline", "faults"):
        ph = [p for p in phases if p["kind"] == kind]
        samples = np.concatenate([np.asarray(p.get("samples_ms", []), np.float64) for p in ph] or [[]])
        d = describe_ms(samples) if samples.size else {}
        d.pop("n", None)
        out[kind] = {
            **d,
            "phases": len(ph),
            "published": sum(p["published"] for p in ph),
            "dropped": sum(p["dropped"] for p in ph),
            "received_by_fast_subscriber": sum(p["received_by_fast_subscriber"] for p in ph),
            "not_received_by_fast_subscriber": sum(p["not_received_by_fast_subscriber"] for p in ph),
            "seq_gaps": sum(p["seq_gaps"] for p in ph),
            "cpu_pct_node": float(np.mean([p["cpu_pct_node"] for p in ph])) if ph else None,
            "cpu_pct_fault_subscribers": float(np.mean([p["cpu_pct_fault_subscribers"] for p in ph]))
            if ph
            else None,
        }
    b, f = out["baseline"], out["faults"]
    for q in ("p50", "p95", "p99"):
        key = f"{q}_ms"
        out[f"ratio_{q}"] = f[key] / b[key] if key in b and key in f and b[key] else None
    for q in ("p50", "p99"):
        r = out[f"ratio_{q}"]
        out[f"ratio_{q}_met"] = r is not None and r <= TARGET_RATIO
    per_round = []
    for rnd in sorted({p["round"] for p in phases}):
        pair = {p["kind"]: p for p in phases if p["round"] == rnd}
        row: dict[str, Any] = {"round": rnd}
        for q in ("p50", "p99"):
            key = f"{q}_ms"
            pb, pf = pair.get("baseline", {}), pair.get("faults", {})
            row[f"ratio_{q}"] = pf[key] / pb[key] if key in pb and key in pf and pb[key] else None
        per_round.append(row)
    out["per_round"] = per_round
    for q in ("p50", "p99"):
        vals = [r[f"ratio_{q}"] for r in per_round if r[f"ratio_{q}"] is not None]
        if vals:
            out[f"ratio_{q}_per_round_range"] = [min(vals), float(np.median(vals)), max(vals)]
    out["leaks"] = {
        "rss_delta_mb": after["rss_mb"] - before["rss_mb"],
        "fds_delta": after["fds"] - before["fds"],
        "threads_delta": after["threads"] - before["threads"],
        "fds_back": after["fds"] <= before["fds"],
        "threads_back": after["threads"] <= before["threads"],
    }
    return out
