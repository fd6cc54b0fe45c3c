"""The benchmark harness: options, inputs, node/subscriber processes and the joining of their logs.

Public helpers that the sweep (runner.py), the soak (soak.py) and the fault run (faults.py) share;
nothing here runs a benchmark by itself.

The sweep: real node and subscriber processes per (engine, rate), prompts switched live.

Per (engine, source rate) one ``fluorosam-rt serve`` process and one subscriber process are
started; the prompt count is then changed over the control socket (the node's normal path), and
each prompt count gets a warm-up and a measurement window. Everything a cell reports is taken
at the window's edges (accounting, CPU time, peak RSS) or joined afterwards (latencies), so the
benchmark itself does nothing on the node's CPU while a window is open.
"""

from __future__ import annotations

import json
import os
import platform
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..service.flow import MISSING, SEGMENTS, STAGES, describe_ms
from .procs import load_average

REPO_ROOT = Path(__file__).resolve().parents[2]
UNTHROTTLED_FPS = 1000.0  # the replay source's ceiling: always faster than the model
PROMPT_TEXTS = (
    "left lung",
    "right lung",
    "heart",
    "spine",
    "left clavicle",
    "right clavicle",
    "trachea",
    "aorta",
    "diaphragm",
    "ribs",
)
# Segments of the joined flow (node ring + subscriber): they telescope to source -> received by
# the subscriber, so their means add up to the end-to-end mean up to float rounding.
BENCH_SEGMENTS = (*(name for name, _, _ in SEGMENTS), "transport")
SUM_TOLERANCE_MS = 0.01


class BenchError(RuntimeError):
    """A benchmark process that would not start or answer; the message says which and why."""


@dataclass
class BenchOptions:
    out_dir: Path
    engines: list[str] | None = None  # None: every back end that loads here (torch, onnxruntime)
    rates: list[float] = field(default_factory=lambda: [7.5, 15.0, 30.0, 0.0])  # 0: unthrottled
    prompts: list[int] = field(default_factory=lambda: [1, 3, 10])
    warmup_s: float = 3.0
    measure_s: float = 15.0
    baseline_frames: int = 20
    floor_seconds: float = 3.0
    frame_size: int = 1024
    n_frames: int = 16
    downsample: int = 1
    mask_encoding: str = "u8"
    checkpoint: str | None = None
    # A second model measured in the same run, group by group next to the first (issue 16: v1 and
    # v2 side by side): a checkpoint path, or "embedded" for the embedded default model.
    compare_checkpoint: str | None = None
    threads: int = 0
    quick: bool = False
    geometry: bool = True  # the geometry stage's cost, flicker and geometry-only transport (geometry.py)
    soak_minutes: float | None = None
    soak_interval_s: float = 10.0
    soak_engine: str | None = None
    faults: bool = False  # only the subscriber-fault run (fluorosam_rt/bench/faults.py)
    faults_phase_s: float = 25.0
    faults_rounds: int = 4
    faults_settle_s: float = 3.0
    faults_engine: str | None = None
    faults_transport: str = "tcp"
    faults_baseline_peers: str = "healthy"  # healthy: 3 well-behaved peers in the baseline; none
    report: Path | None = None
    keep_workdir: bool = False
    argv: list[str] = field(default_factory=list)


def fps_label(rate: float) -> str:
    return "unthrottled" if not rate else f"{rate:g}"


# --------------------------------------------------------------------------- inputs


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_before": load_average(),
    }
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "fluorosam_rt",
                "engines",
                "bridge",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


EMBEDDED = "embedded"


def prepare_model(
    opts: BenchOptions, work: Path, checkpoint: str | None = None
) -> tuple[Any, str | None, str]:
    """(bundle, checkpoint path for the node or None for the embedded model, weights description).

    ``checkpoint`` overrides ``opts.checkpoint`` (the comparison model); ``"embedded"`` names the
    embedded default model explicitly.
    """
    import torch

    from ..bundle import DEFAULT_MODEL_PATH, load_bundle

    checkpoint = checkpoint or opts.checkpoint
    if checkpoint == EMBEDDED:
        if not DEFAULT_MODEL_PATH.is_file():
            raise FileNotFoundError(f"the embedded default model is not installed ({DEFAULT_MODEL_PATH})")
        checkpoint = None
    elif checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"no checkpoint file {checkpoint}")
        return load_bundle(checkpoint), checkpoint, f"checkpoint {checkpoint}"
    if DEFAULT_MODEL_PATH.is_file():
        return load_bundle(None), None, f"embedded default model ({DEFAULT_MODEL_PATH.name})"
    from ..checkpoint import save_native
    from ..model.build import build_model
    from ..model.config import small_realtime
    from ..text.minilm import MiniLMTextEncoder

    torch.manual_seed(0)
    model = build_model(small_realtime())
    enc = MiniLMTextEncoder()
    path = work / "random_small.safetensors"
    # presence threshold -inf: every prompt yields a mask, so the work per frame is the full work
    save_native(model, path, {"kind": "minilm", "identity": enc.identity()}, {"presence_threshold": -1e9})
    weights = "random-weight small_realtime() model (the embedded model is not installed; timing only)"
    return load_bundle(path), str(path), weights


def prepare_frames(opts: BenchOptions, work: Path) -> tuple[Path, list[np.ndarray], str]:
    """A folder of 16-bit square frames for the replay source, and the same frames in memory."""
    import cv2

    folder = work / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    real = REPO_ROOT.parent / "shared" / "data" / "chest-xray-hannover" / "images"
    files = sorted(real.glob("*.png"))[: opts.n_frames] if real.is_dir() else []
    s = opts.frame_size
    frames = []
    for i in range(opts.n_frames):
        img = cv2.imread(str(files[i]), cv2.IMREAD_GRAYSCALE) if i < len(files) else None
        if img is None:  # no shared data: smooth synthetic projections of the same size
            rng = np.random.default_rng(i)
            img = cv2.GaussianBlur(rng.random((s, s)).astype(np.float32), (0, 0), s / 16)
            img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)
        img = cv2.resize(img.astype(np.float32), (s, s), interpolation=cv2.INTER_AREA)
        u16 = np.clip(img * 257.0, 0, 65535).astype(np.uint16)
        cv2.imwrite(str(folder / f"{i:04d}.png"), u16)
        frames.append(u16)
    desc = (
        f"{len(files)} chest radiographs (shared/data/chest-xray-hannover) "
        if files
        else "synthetic smooth images "
    ) + f"as {s}x{s} uint16, looped"
    return folder, frames, desc


def resolve_engines(opts: BenchOptions, model: Any) -> tuple[list[str], dict[str, str]]:
    """Engines to sweep; each is built once here (fills the engine cache, proves it loads)."""
    from engines.select import EngineSettings, create_engine

    wanted = opts.engines or ["torch", "onnxruntime"]
    ok, skipped = [], {}
    for name in wanted:
        if name == "torch":
            ok.append(name)
            continue
        try:
            create_engine(EngineSettings(name, strict=True, device="cpu"), model)
            ok.append(name)
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return ok, skipped


# --------------------------------------------------------------------------- processes


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_json_line(proc: subprocess.Popen, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before it was ready")
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            if line.strip().startswith("{"):
                return json.loads(line)
    raise BenchError(f"{what} was not ready within {timeout:.0f} s")


@dataclass
class Group:
    """One node process and one subscriber process for one engine and source rate."""

    node: subprocess.Popen
    sub: subprocess.Popen
    control: str
    sub_out: str
    logs: list[Any]
    masks: str = ""  # the node's publish endpoint


def start_group(
    work: Path,
    tag: str,
    opts: BenchOptions,
    engine: str,
    rate: float,
    frames_dir: Path,
    checkpoint: str | None,
    prompts: Sequence[str],
    max_seconds: float,
    publish_endpoint: str | None = None,
    publish_extra: dict[str, Any] | None = None,
) -> Group:
    gdir = Path(tempfile.mkdtemp(prefix=tag[:20] + "-", dir=work))
    masks, control = publish_endpoint or f"ipc://{gdir}/masks", f"ipc://{gdir}/control"
    settings = {
        "stream": "bench",
        "source": {
            "kind": "replay",
            "path": str(frames_dir),
            "fps": rate or UNTHROTTLED_FPS,
            "loop": True,
        },
        "model": {"checkpoint": checkpoint, "engine": engine, "threads": opts.threads},
        "publish": {
            "endpoints": [masks],
            "downsample": opts.downsample,
            "mask_encoding": opts.mask_encoding,
            **(publish_extra or {}),  # e.g. include_image for the web viewer's cost run
        },
        "control": {"endpoint": control},
        "prompts": list(prompts),
    }
    cfg = gdir / "node.yaml"
    cfg.write_text(json.dumps(settings))  # JSON is YAML
    logs = [open(gdir / "subscriber.log", "w"), open(gdir / "node.log", "w")]  # noqa: SIM115
    sub_out = str(gdir / "subscriber")
    sub = subprocess.Popen(
        [sys.executable, "-m", "fluorosam_rt.bench.subscriber", masks, sub_out, "--topic", "bench"],
        stdout=subprocess.PIPE,
        stderr=logs[0],
        text=True,
        env=subprocess_env(),
    )
    node = None
    try:
        read_json_line(sub, 60, "the benchmark subscriber")
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluorosam_rt.cli",
                "serve",
                "--config",
                str(cfg),
                "--keep-running",
                "--max-seconds",
                str(max_seconds),
            ],
            stdout=subprocess.PIPE,
            stderr=logs[1],
            text=True,
            env=subprocess_env(),
        )
        read_json_line(node, 300, f"the node ({engine}, {fps_label(rate)} fps; log {gdir / 'node.log'})")
    except BaseException:
        for p in (node, sub):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        raise
    return Group(node=node, sub=sub, control=control, sub_out=sub_out, logs=logs, masks=masks)


def stop_group(g: Group) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Shut the node down over control, then the subscriber; (node final, sub rows, sub counters)."""
    from ..service.control import send_command

    final: dict[str, Any] = {}
    try:
        send_command(g.control, {"cmd": "shutdown"}, timeout=10)
        out, _ = g.node.communicate(timeout=60)
        for line in out.splitlines():
            if line.strip().startswith("{") and '"stopped"' in line:
                final = json.loads(line)
    except (TimeoutError, subprocess.TimeoutExpired):
        g.node.kill()
        g.node.wait()
    time.sleep(0.3)  # the last messages reach the subscriber
    g.sub.send_signal(signal.SIGTERM)
    try:
        g.sub.wait(timeout=30)
    except subprocess.TimeoutExpired:
        g.sub.kill()
        g.sub.wait()
    for f in g.logs:
        f.close()
    try:
        rows = np.load(g.sub_out + ".npz")["rows"]
        counters = json.loads(Path(g.sub_out + ".json").read_text())
    except OSError:
        rows, counters = np.zeros((0, 6), np.int64), {}
    return final, rows, counters


def fetch_flow(control: str, since: int) -> tuple[int, list[int], list[list[int | None]]]:
    """All ring rows from record ``since`` on (paged), and the next record index."""
    from ..service.control import send_command

    ids: list[int] = []
    ns: list[list[int | None]] = []
    while True:
        flow = send_command(control, {"cmd": "flow", "since": since}, timeout=30)["flow"]
        ids += flow["frame_id"]
        ns += flow["ns"]
        since = flow["next"]
        if since >= flow["count"]:
            return since, ids, ns


class FlowLog:
    """The node's per-frame stage timestamps, read in pages while a run goes on (the node's ring
    would overwrite them otherwise), and turned into arrays once at the end."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.since = 0
        self.ids: list[int] = []
        self.ns: list[list[int | None]] = []

    def fetch(self) -> None:
        self.since, ids, ns = fetch_flow(self.control, self.since)
        self.ids += ids
        self.ns += ns

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids, ring rows) of everything fetched."""
        return np.asarray(self.ids, dtype=np.int64), ring_array(self.ns)


def stats(control: str) -> dict[str, Any]:
    from ..service.control import send_command

    return send_command(control, {"cmd": "stats"}, timeout=30)["stats"]


def set_prompts(control: str, texts: Sequence[str]) -> None:
    from ..service.control import send_command

    reply = send_command(control, {"cmd": "set", "prompts": list(texts)}, timeout=60)
    if not reply.get("ok"):
        raise BenchError(f"the node refused the prompts: {reply.get('error')}")


# --------------------------------------------------------------------------- joining


def ring_array(ns: list[list[int | None]]) -> np.ndarray:
    out = np.full((len(ns), len(STAGES)), MISSING, dtype=np.int64)
    for i, row in enumerate(ns):
        out[i] = [MISSING if v is None else v for v in row]
    return out


def join_cell(
    frame_ids: np.ndarray,
    ring: np.ndarray,
    sub_rows: np.ndarray,
    t0_ns: int,
    t1_ns: int,
) -> dict[str, Any]:
    """Latency of one window: node ring rows whose frame entered in [t0, t1), joined by frame id
    with the subscriber's receive times (all CLOCK_MONOTONIC ns)."""
    col = {s: j for j, s in enumerate(STAGES)}
    received = ring[:, col["received"]]
    inwin = (received >= t0_ns) & (received < t1_ns)
    fid, r = frame_ids[inwin], ring[inwin]
    out: dict[str, Any] = {"node_published_in_window": int(inwin.sum()), "joined": 0}
    if not sub_rows.size or not fid.size:
        return out
    sorted_sub = sub_rows[np.argsort(sub_rows[:, 0], kind="stable")]
    sub_ids = sorted_sub[:, 0]
    pos = np.minimum(np.searchsorted(sub_ids, fid), sub_ids.size - 1)
    found = sub_ids[pos] == fid
    sub = sorted_sub[pos[found]]
    r = r[found]
    start = np.where(r[:, col["source"]] != MISSING, r[:, col["source"]], r[:, col["received"]])
    recv_mono = sub[:, 2]
    e2e = (recv_mono - start) / 1e6
    out["joined"] = int(found.sum())
    if not e2e.size:
        return out
    stages: dict[str, Any] = {}
    seg_means = 0.0
    for name, a, b in SEGMENTS:
        x, y = r[:, col[a]], r[:, col[b]]
        if a == "source":
            x = start
        ok = (x != MISSING) & (y != MISSING)
        d = (y[ok] - x[ok]) / 1e6
        if d.size:
            stages[name] = describe_ms(d)
            seg_means += float(d.sum()) / e2e.size
    transport = (recv_mono - r[:, col["published"]]) / 1e6
    stages["transport"] = describe_ms(transport)
    seg_means += float(transport.mean())
    # Cross-check of the clock conversion: the subscriber's wall-clock view of the same span.
    wall_e2e = (sub[:, 3] - sub[:, 4]) / 1e6
    has_wall = sub[:, 4] > 0
    out.update(describe_ms(e2e))
    out.update(
        {
            "stages": stages,
            "stage_sum_mean_ms": seg_means,
            "stage_sum_error_ms": abs(seg_means - float(e2e.mean())),
            "wall_vs_mono_max_abs_ms": float(np.abs(wall_e2e[has_wall] - e2e[has_wall]).max())
            if has_wall.any()
            else None,
            "node_compute_mean_ms": float(
                sum(
                    stages[s]["mean_ms"]
                    for s in ("preprocess", "encode", "decode", "postprocess")
                    if s in stages
                )
            ),
            "samples_ms": [round(float(v), 3) for v in np.sort(e2e)],
        }
    )
    return out


def delta(s0: dict[str, Any], s1: dict[str, Any]) -> dict[str, Any]:
    reasons = set(s0["dropped"]) | set(s1["dropped"])
    by_reason = {k: s1["dropped"].get(k, 0) - s0["dropped"].get(k, 0) for k in sorted(reasons)}
    return {
        "frames_in": s1["received"] - s0["received"],
        "published": s1["published"] - s0["published"],
        "dropped": s1["dropped_total"] - s0["dropped_total"],
        "dropped_by_reason": {k: v for k, v in by_reason.items() if v},
        "in_flight_delta": s1["in_flight"] - s0["in_flight"],
    }
