"""``python -m fluorosam_rt.bench.web_cost``: what the web viewer costs the node's other subscribers.

Issue 19 asks that, at 15 fps with 3 prompts on the 2-core machine, the browser viewer
(``fluorosam-rt bridge web``) add at most 5 ms p99 to the node's latency for the other
subscribers, and that its memory stay flat over a soak. This measures both on the real node, set
up as the benchmark's soak and fault runs are (bench/runner.py: replayed frames, the node and the
benchmark's fast subscriber in their own processes, latency joined from the node's flow ring and
the subscriber's receive times), with the node publishing its preview image so the viewer does
its full work (JPEG and mask planes per frame):

* **phases**, alternating in ABBA order so a drift in the machine's load weighs on both:
  ``baseline`` (node and fast subscriber only) and ``viewer`` (plus the viewer process and one
  client tab that acknowledges every frame as a drawing browser does). Each viewer phase starts
  the viewer and its client, waits ``settle_s``, measures ``phase_s``, then stops them;
* **soak** (``--soak-minutes``): viewer and client attached for that long; the viewer's RSS and
  the fast subscriber's latency are sampled every ``--soak-interval`` seconds.

The client is either a WebSocket client thread in this process (``--client ws``: the browser as
it would be on another machine, costing the node's machine only the viewer) or headless chromium
driven by selenium (``--client chromium``: a browser on the node's own machine, the worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..service.flow import describe_ms
from .harness import (
    PROMPT_TEXTS,
    BenchError,
    BenchOptions,
    FlowLog,
    delta,
    join_cell,
    machine_info,
    prepare_frames,
    prepare_model,
    resolve_engines,
    start_group,
    stats,
    stop_group,
    subprocess_env,
)
from .procs import cpu_seconds, load_average, memory_mb, stop_on_signals

FPS, PROMPTS = 15.0, 3
TARGET_ADDED_P99_MS = 5.0
URL_LINE = re.compile(r"viewer: (http://\S+)")


# --------------------------------------------------------------------------- viewer and its client


class WsClient:
    """A tab that draws nothing but acknowledges every frame at once: its own process, at the
    lowest CPU priority, standing in for a browser on another machine (so the rig's own work
    competes with the node as little as the real remote browser would)."""

    def __init__(self, url: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluorosam_rt.bench.web_cost", "--ws-client", url, str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=subprocess_env(),
        )

    @property
    def frames(self) -> int:
        try:
            return int(json.loads(self.out.read_text())["frames"])
        except (OSError, ValueError, KeyError):
            return 0

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid) if self.proc.poll() is None else 0.0

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return {"frames": 0, "error": "no counters written"}


def ws_client_main(url: str, out: str) -> int:
    """The client process: read frames, acknowledge each, write counters every second and at SIGTERM."""
    import os

    import aiohttp

    os.nice(19)
    stop = stop_on_signals()
    counts: dict[str, Any] = {"frames": 0, "bytes": 0, "error": None}

    def dump() -> None:
        Path(out).write_text(json.dumps(counts))

    async def client() -> None:
        ws_url = url.replace("http://", "ws://").rstrip("/") + "/ws"
        last = time.monotonic()
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=64 << 20) as ws:
            while not stop.is_set():
                try:
                    m = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    m = None
                if m is not None and m.type == aiohttp.WSMsgType.BINARY:
                    counts["frames"] += 1
                    counts["bytes"] += len(m.data)
                    await ws.send_str('{"type":"ack"}')
                elif m is not None and m.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
                if time.monotonic() - last > 1.0:
                    dump()
                    last = time.monotonic()

    try:
        asyncio.run(client())
    except Exception as exc:
        counts["error"] = f"{type(exc).__name__}: {exc}"
    dump()
    return 0


class ChromiumClient:
    """Debian's headless chromium showing the page (it draws, then acknowledges, each frame)."""

    def __init__(self, url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if not (chromium and driver):
            raise BenchError("--client chromium needs Debian's chromium and chromium-driver")
        o = webdriver.ChromeOptions()
        o.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
            o.add_argument(arg)
        o.add_argument("--window-size=1280,900")
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=o)
        self.driver.get(url)

    def frames(self) -> int:
        return int(
            self.driver.execute_script("return Number(document.getElementById('view').dataset.frames||0)")
        )

    def stop(self) -> dict[str, Any]:
        try:
            n = self.frames()
        finally:
            self.driver.quit()
        return {"frames": n}


class ViewerProc:
    """``fluorosam-rt bridge web`` as an operator runs it (its own process), plus one client."""

    def __init__(self, masks: str, control: str, log: Path, client: str) -> None:
        self.log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "web", "--connect", masks, "--control", control, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=subprocess_env(),
        )
        self.client: Any = None
        try:
            self.url = self._read_url(60)
            if client == "ws":
                self.client = WsClient(self.url, log.with_suffix(".client.json"))
            elif client == "chromium":
                self.client = ChromiumClient(self.url)
        except BaseException:
            self.stop()
            raise

    def _read_url(self, timeout: float) -> str:
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the viewer exited with {self.proc.returncode} (log {self.log.name})")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                m = URL_LINE.search(self.proc.stdout.readline())
                if m:
                    return m.group(1)
        raise BenchError(f"the viewer printed no URL within {timeout:.0f} s (log {self.log.name})")

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def client_cpu(self) -> float:
        return self.client.cpu() if isinstance(self.client, WsClient) else 0.0

    def rss_mb(self) -> float:
        return memory_mb(self.proc.pid)["rss_mb"]

    def stop(self) -> dict[str, Any]:
        out = self.client.stop() if self.client is not None else {}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()
        return {"client": out, "exit_code": self.proc.returncode}


# --------------------------------------------------------------------------- the run


def phase_plan(rounds: int) -> list[tuple[int, str]]:
    """ABBA...: round r is (baseline, viewer) for even r and (viewer, baseline) for odd r."""
    plan = []
    for r in range(rounds):
        kinds = ("baseline", "viewer") if r % 2 == 0 else ("viewer", "baseline")
        plan += [(r, k) for k in kinds]
    return plan


def run(args: argparse.Namespace, progress: Any = print) -> dict[str, Any]:
    opts = BenchOptions(
        out_dir=Path(args.out), frame_size=args.frame_size, warmup_s=args.warmup, threads=args.threads
    )
    work = Path(tempfile.mkdtemp(prefix="fsam-webcost-"))
    try:
        result: dict[str, Any] = {"command": ["python", "-m", "fluorosam_rt.bench.web_cost", *sys.argv[1:]]}
        result["machine"] = machine_info()
        bundle, checkpoint, weights = prepare_model(opts, work)
        frames_dir, _, frames_desc = prepare_frames(opts, work)
        engines, _ = resolve_engines(BenchOptions(out_dir=opts.out_dir, engines=[args.engine]), bundle.model)
        engine = engines[0] if engines else "torch"
        plan = phase_plan(args.rounds)
        duration = len(plan) * (args.phase_s + args.settle_s + 90) + args.soak_minutes * 60 + 600
        g = start_group(
            work,
            "webcost",
            opts,
            engine,
            FPS,
            frames_dir,
            checkpoint,
            PROMPT_TEXTS[:PROMPTS],
            duration,
            publish_extra={"include_image": True},
        )
        result["config"] = {
            "engine": engine,
            "weights": weights,
            "frames": frames_desc,
            "fps": FPS,
            "prompts": PROMPTS,
            "client": args.client,
            "phase_s": args.phase_s,
            "settle_s": args.settle_s,
            "rounds": args.rounds,
            "order": "".join("A" if k == "baseline" else "B" for _, k in plan),
            "soak_minutes": args.soak_minutes,
        }
        flow = FlowLog(g.control)
        windows: list[dict[str, Any]] = []
        soak: list[dict[str, Any]] = []
        viewer: ViewerProc | None = None
        try:
            time.sleep(opts.warmup_s)
            for i, (rnd, kind) in enumerate(plan):
                progress(f"  phase {i + 1}/{len(plan)} (round {rnd + 1}) {kind:<8} {args.phase_s:g} s")
                if kind == "viewer":
                    viewer = ViewerProc(g.masks, g.control, work / f"viewer{i}.log", args.client)
                time.sleep(args.settle_s)
                s0, c0 = stats(g.control), cpu_seconds(g.node.pid)
                v0 = viewer.cpu() if viewer else 0.0
                k0 = viewer.client_cpu() if viewer else 0.0
                t0, w0 = time.monotonic_ns(), time.monotonic()
                time.sleep(args.phase_s)
                t1, wall = time.monotonic_ns(), time.monotonic() - w0
                s1, c1 = stats(g.control), cpu_seconds(g.node.pid)
                row: dict[str, Any] = {
                    "phase": i,
                    "round": rnd,
                    "kind": kind,
                    "window_s": wall,
                    "t0": t0,
                    "t1": t1,
                }
                row.update(delta(s0, s1))
                row["cpu_pct_node"] = 100 * (c1 - c0) / wall
                row["load_average"] = load_average()
                if viewer is not None:
                    row["cpu_pct_viewer"] = 100 * (viewer.cpu() - v0) / wall
                    row["cpu_pct_client"] = 100 * (viewer.client_cpu() - k0) / wall
                    row["viewer_rss_mb"] = viewer.rss_mb()
                    row["viewer"] = viewer.stop()
                    viewer = None
                flow.fetch()
                windows.append(row)
            if args.soak_minutes > 0:
                soak = run_soak(g, flow, args, work, progress)
        finally:
            if viewer is not None:
                viewer.stop()
            final, sub_rows, counters = stop_group(g)
        frame_ids, ring = flow.arrays()
        for w in windows + soak:
            j = join_cell(frame_ids, ring, sub_rows, w.pop("t0"), w.pop("t1"))
            w["received_by_fast_subscriber"] = j["joined"]
            w.update({k: j[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms") if k in j})
            w["samples_ms"] = j.get("samples_ms", [])
            # where the time went: the node's stages and the transport to the fast subscriber
            w["stage_p50_ms"] = {k: round(v["p50_ms"], 2) for k, v in j.get("stages", {}).items()}
            w["stage_p99_ms"] = {k: round(v["p99_ms"], 2) for k, v in j.get("stages", {}).items()}
        result["phases"] = windows
        result["soak"] = [{k: v for k, v in s.items() if k != "samples_ms"} for s in soak]
        result["final"] = {**final, "subscriber": counters}
        result["summary"] = summary(windows, soak)
        result["machine"]["load_after"] = load_average()
        for w in windows:
            w.pop("samples_ms", None)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_soak(
    g: Any, flow: FlowLog, args: argparse.Namespace, work: Path, progress: Any
) -> list[dict[str, Any]]:
    """Viewer and client attached for the whole soak; RSS and latency per interval."""
    viewer = ViewerProc(g.masks, g.control, work / "viewer-soak.log", args.client)
    samples = []
    try:
        time.sleep(args.settle_s)
        begin = time.monotonic()
        t_prev, c_prev = time.monotonic_ns(), viewer.cpu()
        while time.monotonic() - begin < args.soak_minutes * 60:
            time.sleep(args.soak_interval)
            t_now, c_now = time.monotonic_ns(), viewer.cpu()
            flow.fetch()
            samples.append(
                {
                    "t_s": round(time.monotonic() - begin, 1),
                    "viewer_rss_mb": viewer.rss_mb(),
                    "cpu_pct_viewer": 100 * (c_now - c_prev) / ((t_now - t_prev) / 1e9),
                    "client_frames": _client_frames(viewer.client),
                    "t0": t_prev,
                    "t1": t_now,
                }
            )
            t_prev, c_prev = t_now, c_now
            progress(f"  soak {samples[-1]['t_s']:7.1f} s  viewer RSS {samples[-1]['viewer_rss_mb']:.1f} MiB")
    finally:
        viewer.stop()
    return samples


def _client_frames(client: Any) -> int:
    if client is None:
        return 0
    return client.frames if isinstance(client, WsClient) else client.frames()


def verdict(phases: list[dict[str, Any]], added_p99_ms: float | None) -> str:
    """ "met", "not met", or "inconclusive" when the baseline phases alone differ at p99 by more
    than the target: on a machine that busy, a difference of 5 ms cannot be told from noise."""
    base = [p["p99_ms"] for p in phases if p["kind"] == "baseline" and "p99_ms" in p]
    if added_p99_ms is None or not base:
        return "no data"
    spread = max(base) - min(base)
    if spread > TARGET_ADDED_P99_MS:
        return f"inconclusive (the baseline phases alone differ by {spread:.0f} ms at p99)"
    return "met" if added_p99_ms <= TARGET_ADDED_P99_MS else "not met"


def summary(phases: list[dict[str, Any]], soak: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"target_added_p99_ms": TARGET_ADDED_P99_MS}
    for kind in ("baseline", "viewer"):
        ph = [p for p in phases if p["kind"] == kind]
        samples = np.concatenate([np.asarray(p.get("samples_ms", []), np.float64) for p in ph] or [[]])
        d = describe_ms(samples) if samples.size else {}
        out[kind] = {
            **d,
            "phases": len(ph),
            "published": sum(p["published"] for p in ph),
            "dropped": sum(p["dropped"] for p in ph),
            "cpu_pct_node": float(np.mean([p["cpu_pct_node"] for p in ph])) if ph else None,
        }
        if kind == "viewer" and ph:
            out[kind]["cpu_pct_viewer"] = float(np.mean([p["cpu_pct_viewer"] for p in ph]))
            out[kind]["client_frames"] = sum(p["viewer"]["client"].get("frames", 0) for p in ph)
            out[kind]["cpu_pct_client"] = float(np.mean([p.get("cpu_pct_client", 0.0) for p in ph]))
    b, v = out["baseline"], out["viewer"]
    for q in ("p50", "p95", "p99"):
        k = f"{q}_ms"
        out[f"added_{q}_ms"] = v[k] - b[k] if k in b and k in v else None
    per_round = []
    for rnd in sorted({p["round"] for p in phases}):
        pair = {p["kind"]: p for p in phases if p["round"] == rnd}
        pb, pv = pair.get("baseline", {}), pair.get("viewer", {})
        per_round.append(
            {
                "round": rnd,
                **{
                    f"added_{q}_ms": pv[f"{q}_ms"] - pb[f"{q}_ms"]
                    for q in ("p50", "p99")
                    if f"{q}_ms" in pv and f"{q}_ms" in pb
                },
            }
        )
    out["per_round"] = per_round
    out["added_p99_met"] = out["added_p99_ms"] is not None and out["added_p99_ms"] <= TARGET_ADDED_P99_MS
    out["verdict"] = verdict(phases, out["added_p99_ms"])
    if soak:
        rss = np.asarray([s["viewer_rss_mb"] for s in soak])
        half = max(1, len(rss) // 2)
        out["soak"] = {
            "minutes": round(soak[-1]["t_s"] / 60, 2),
            "rss_first_mb": float(rss[0]),
            "rss_last_mb": float(rss[-1]),
            "rss_max_mb": float(rss.max()),
            # growth over the second half: start-up allocations are done by then
            "rss_growth_second_half_mb": float(rss[-1] - rss[half - 1]) if len(rss) > 1 else 0.0,
            "cpu_pct_viewer_mean": float(np.mean([s["cpu_pct_viewer"] for s in soak])),
            "p99_ms_per_interval": [s.get("p99_ms") for s in soak],
        }
    return out


def render_markdown(result: dict[str, Any]) -> str:
    s, c = result["summary"], result["config"]
    m = result["machine"]

    def f(v: Any, nd: int = 1) -> str:
        return "–" if v is None else f"{v:.{nd}f}"

    lines = [
        "# Web viewer cost",
        "",
        f"Generated by `{' '.join(result['command'])}`. Machine: {m.get('cpu', '?')}, "
        f"load average before {m.get('load_before')} and after {m.get('load_after')} (the machine is "
        "shared with other jobs). Node: "
        f"{c['engine']}, {c['fps']:g} fps, {c['prompts']} prompts, {c['frames']}, preview image on; "
        f"client: {c['client']}; {c['rounds']} rounds of {c['phase_s']:g} s phases, order {c['order']}.",
        "",
        "Latency is the benchmark's end to end (frame handed to the node -> masks decoded by its fast "
        "subscriber), pooled over the phases of each condition.",
        "",
        "| condition | frames | p50 ms | p95 ms | p99 ms | max ms | node CPU % | viewer CPU % "
        "| client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("baseline", "viewer"):
        k = s[kind]
        lines.append(
            f"| {kind} | {k.get('n', 0)} | {f(k.get('p50_ms'))} | {f(k.get('p95_ms'))} | "
            f"{f(k.get('p99_ms'))} | {f(k.get('max_ms'))} | {f(k.get('cpu_pct_node'))} | "
            f"{f(k.get('cpu_pct_viewer'))} | {f(k.get('cpu_pct_client'))} |"
        )
    lines += [
        "",
        f"Added by the viewer: p50 {f(s['added_p50_ms'], 2)} ms, p95 {f(s['added_p95_ms'], 2)} ms, "
        f"**p99 {f(s['added_p99_ms'], 2)} ms** (target <= {s['target_added_p99_ms']:g} ms: "
        f"{verdict(result['phases'], s['added_p99_ms'])}). Per round (viewer - baseline): "
        + ", ".join(
            f"p50 {f(r.get('added_p50_ms'), 2)} / p99 {f(r.get('added_p99_ms'), 2)}" for r in s["per_round"]
        )
        + f". Frames the client got in viewer phases: {s['viewer'].get('client_frames')}.",
    ]
    if "soak" in s:
        k = s["soak"]
        lines += [
            "",
            f"Soak: {k['minutes']:g} min with the viewer and its client attached. Viewer RSS first "
            f"{k['rss_first_mb']:.1f} MiB, last {k['rss_last_mb']:.1f} MiB, max {k['rss_max_mb']:.1f} MiB; "
            f"growth over the second half {k['rss_growth_second_half_mb']:+.2f} MiB; viewer CPU "
            f"{k['cpu_pct_viewer_mean']:.1f} % on average.",
            "",
            "| t s | viewer RSS MiB | viewer CPU % | fast subscriber p99 ms |",
            "|---|---|---|---|",
        ]
        for row in result["soak"]:
            lines.append(
                f"| {row['t_s']:g} | {row['viewer_rss_mb']:.1f} | {row['cpu_pct_viewer']:.1f} | "
                f"{f(row.get('p99_ms'))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fluorosam_rt.bench.web_cost", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--out", default="out/bench-web", help="folder for web_cost.json")
    ap.add_argument("--report", help="also write the markdown here (e.g. docs/benchmarks-web.md)")
    ap.add_argument(
        "--client", choices=["ws", "chromium", "none"], default="ws", help="none: the viewer with no tab open"
    )
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--phase-s", type=float, default=20.0)
    ap.add_argument("--settle-s", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--soak-minutes", type=float, default=0.0)
    ap.add_argument("--soak-interval", type=float, default=10.0)
    ap.add_argument("--frame-size", type=int, default=1024)
    ap.add_argument("--engine", default="onnxruntime", help="node engine (falls back to torch)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ws-client", nargs=2, metavar=("URL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ws_client:
        return ws_client_main(*args.ws_client)
    if args.rounds < 1 or args.phase_s <= 0 or args.soak_minutes < 0:
        print("web_cost: --rounds must be >= 1, --phase-s > 0, --soak-minutes >= 0", file=sys.stderr)
        return 2
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "web_cost.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    if args.report:
        Path(args.report).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
