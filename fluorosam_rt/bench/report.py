"""The benchmark's outputs: terminal table, JSON, PNG plots and docs/benchmarks.md.

All of them are rendered from the one result dict, so the report's numbers are the run's numbers
and ``--render JSON`` can rebuild the plots and the markdown without measuring again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TARGET_P99_MS = 33.0
TARGET_RSS_GROWTH_PCT = 5.0
TARGET_P99_FLAT_PCT = 10.0
STAGE_ORDER = (
    "ingest",
    "queue",
    "preprocess",
    "encode",
    "decode",
    "postprocess",
    "geometry",
    "publish_wait",
    "transport",
)
NOTES_BEGIN, NOTES_END = "<!-- notes: kept when the report is regenerated -->", "<!-- /notes -->"


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def find_cell(result: dict[str, Any], fps: float, prompts: int, engine: str | None = None) -> dict | None:
    cells = [c for c in result.get("cells", []) if c["fps"] == fps and c["prompts"] == prompts]
    if engine:
        cells = [c for c in cells if c["engine"] == engine]
    cells = [c for c in cells if "p99_ms" in c]
    return min(cells, key=lambda c: c["p99_ms"]) if cells else None


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for 15 fps and 3 prompts (best engine), met or missed and by how much."""
    out: dict[str, Any] = {}
    c = find_cell(result, 15.0, 3)
    if c is None:
        return {"note": "no 15 fps / 3 prompt cell in this run"}
    out["engine"] = c["engine"]
    out["p99_le_33ms"] = {
        "value_ms": c["p99_ms"],
        "target_ms": TARGET_P99_MS,
        "met": c["p99_ms"] <= TARGET_P99_MS,
        "over_by_ms": max(0.0, c["p99_ms"] - TARGET_P99_MS),
    }
    drops = {k: v for k, v in c["dropped_by_reason"].items() if k != "shutdown"}
    out["no_drops_at_15fps"] = {"dropped": sum(drops.values()), "by_reason": drops, "met": not drops}
    if "speedup_p50" in c:
        out["speedup_ge_5x"] = {"value": c["speedup_p50"], "met": c["speedup_p50"] >= 5.0}
    stages = c.get("stages", {})
    total = sum(s["mean_ms"] for s in stages.values()) or 1.0
    out["where_the_time_goes"] = {
        k: round(100 * stages[k]["mean_ms"] / total, 1) for k in STAGE_ORDER if k in stages
    }
    return out


def soak_summary(samples: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """RSS growth after warm-up and p99 drift between the first and last third of the run."""
    if not samples:
        return {}
    warm = min(60.0, 0.2 * duration_s)
    after = [s for s in samples if s["t_s"] >= warm] or samples
    rss0 = after[0]["rss_mb"]
    rss_max = max(s["rss_mb"] for s in after)
    third = max(1, len(after) // 3)
    first = [s["p99_ms"] for s in after[:third] if "p99_ms" in s]
    last = [s["p99_ms"] for s in after[-third:] if "p99_ms" in s]
    out: dict[str, Any] = {
        "warmup_s": warm,
        "rss_after_warmup_mb": rss0,
        "rss_max_mb": rss_max,
        "rss_growth_pct": 100 * (rss_max - rss0) / rss0 if rss0 else None,
        "dropped": sum(s["dropped"] for s in samples),
        "published": sum(s["published"] for s in samples),
    }
    out["rss_growth_met"] = (
        out["rss_growth_pct"] is not None and out["rss_growth_pct"] <= TARGET_RSS_GROWTH_PCT
    )
    if first and last:
        p_first, p_last = float(np.median(first)), float(np.median(last))
        out.update(
            {
                "p99_first_third_ms": p_first,
                "p99_last_third_ms": p_last,
                "p99_drift_pct": 100 * (p_last - p_first) / p_first if p_first else None,
            }
        )
        out["p99_flat_met"] = out["p99_drift_pct"] is not None and out["p99_drift_pct"] <= TARGET_P99_FLAT_PCT
    return out


# --------------------------------------------------------------------------- table


TABLE_COLUMNS = (
    "engine",
    "fps",
    "K",
    "p50",
    "p95",
    "p99",
    "max",
    "thru fps",
    "in",
    "pub",
    "drop",
    "CPU %",
    "RSS MiB",
    "base p50",
    "speedup",
    "/floor",
)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in result.get("cells", []):
        rows.append(
            [
                c["engine"] + ("" if c["engine_actual"] == c["engine"] else f"->{c['engine_actual']}"),
                c["fps_label"],
                str(c["prompts"]),
                _f(c.get("p50_ms")),
                _f(c.get("p95_ms")),
                _f(c.get("p99_ms")),
                _f(c.get("max_ms")),
                _f(c["throughput_fps"]),
                str(c["frames_in"]),
                str(c["published"]),
                str(c["dropped"]),
                _f(c["cpu_pct_node"], 0),
                _f(c["peak_rss_mb"], 0),
                _f(c.get("baseline_p50_ms")),
                _f(c.get("speedup_p50"), 2) + ("x" if "speedup_p50" in c else ""),
                _f(c.get("p50_over_floor"), 1) + ("x" if "p50_over_floor" in c else ""),
            ]
        )
    return rows


def print_table(result: dict[str, Any]) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 180)
    if result.get("cells"):
        m = result["machine"]
        t = Table(
            title=f"fluorosam-rt bench: end-to-end ms (frame in -> mask at subscriber), {m['cores']} cores, "
            f"load {m['load_before']} -> {m.get('load_after')}"
        )
        for col in TABLE_COLUMNS:
            t.add_column(col, justify="left" if col in ("engine", "fps") else "right")
        for row in table_rows(result):
            t.add_row(*row)
        console.print(t)
        fl = result["floor"]
        console.print(
            f"floor: {fl['model_gflops_per_frame']:.2f} GFLOP/frame (K={fl['headline_prompts']}) at "
            f"{fl['cpu_gflops']:.1f} GFLOP/s (best 0.1 s matmul slice) = {fl['floor_ms']:.2f} ms"
        )
        for name, v in result.get("targets", {}).items():
            if isinstance(v, dict) and "met" in v:
                console.print(f"target {name}: {'met' if v['met'] else 'MISSED'} {json.dumps(v)}")
    if result.get("compare"):
        from .compare import COLUMNS, model_lines
        from .compare import table_rows as compare_rows

        t = Table(title="models side by side (B / A), end-to-end ms")
        for col in COLUMNS:
            t.add_column(col, justify="left" if col in ("engine", "fps") else "right")
        for row in compare_rows(result.get("side_by_side") or []):
            t.add_row(*row)
        console.print(t)
        for line in model_lines(result):
            console.print(line)
    for line in geometry_lines(result.get("geometry", {})):
        console.print(line)
    if "soak" in result:
        s = result["soak"]["summary"]
        console.print(f"soak: {json.dumps(s)}")
    if "faults" in result:
        fa = result["faults"]
        t = Table(
            title=f"fluorosam-rt bench --faults: fast subscriber's end-to-end ms, {fa['engine']}, "
            f"{fa['fps']:g} fps, {fa['prompts']} prompts, {fa['transport']}, order {fa['order']}"
        )
        for col in FAULT_COLUMNS:
            t.add_column(col, justify="left" if col == "kind" else "right")
        for row in fault_rows(fa):
            t.add_row(*row)
        console.print(t)
        for line in fault_lines(fa):
            console.print(line)


FAULT_COLUMNS = (
    "#",
    "round",
    "kind",
    "p50",
    "p95",
    "p99",
    "max",
    "pub",
    "recv",
    "missed",
    "seq gaps",
    "pub_wait p99",
    "CPU node %",
    "CPU faults %",
    "RSS MiB",
    "FDs",
    "threads",
)


def fault_rows(fa: dict[str, Any]) -> list[list[str]]:
    rows = []
    for p in fa["phases"]:
        n = p["node_at_window_end"]
        rows.append(
            [
                str(p["phase"] + 1),
                str(p["round"] + 1),
                p["kind"],
                _f(p.get("p50_ms")),
                _f(p.get("p95_ms")),
                _f(p.get("p99_ms")),
                _f(p.get("max_ms")),
                str(p.get("published_in_window", p["published"])),
                str(p["received_by_fast_subscriber"]),
                str(p["not_received_by_fast_subscriber"]),
                str(p["seq_gaps"]),
                _f(p.get("publish_wait_p99_ms"), 2),
                _f(p["cpu_pct_node"], 0),
                _f(p["cpu_pct_fault_subscribers"], 0),
                _f(n["rss_mb"], 0),
                str(n["fds"]),
                str(n["threads"]),
            ]
        )
    return rows


def fault_lines(fa: dict[str, Any]) -> list[str]:
    """The verdict: pooled latency per condition, ratios against the goal, leaks."""
    sm = fa["summary"]
    goal = sm["target_ratio"]
    b, f = sm["baseline"], sm["faults"]
    lines = []
    for name, c in (("baseline", b), ("faults", f)):
        lines.append(
            f"{name:<8} ({c['phases']} phases): p50 {_f(c.get('p50_ms'))} ms, p95 {_f(c.get('p95_ms'))} ms, "
            f"p99 {_f(c.get('p99_ms'))} ms over {c['received_by_fast_subscriber']} frames; "
            f"missed {c['not_received_by_fast_subscriber']}, seq gaps {c['seq_gaps']}; "
            f"node CPU {_f(c['cpu_pct_node'], 0)} %, "
            f"fault subscribers' CPU {_f(c['cpu_pct_fault_subscribers'], 0)} %"
        )
    for q in ("p50", "p99"):
        r = sm.get(f"ratio_{q}")
        rng = sm.get(f"ratio_{q}_per_round_range")
        lines.append(
            f"faults / baseline {q}: {_f(r, 3)} (goal <= {goal:.2f}: "
            f"{'met' if sm.get(f'ratio_{q}_met') else 'MISSED'})"
            + (f"; per round min {rng[0]:.3f}, median {rng[1]:.3f}, max {rng[2]:.3f}" if rng else "")
        )
    lk, nb, na = sm["leaks"], fa["node_before"], fa["node_after"]
    lines.append(
        f"node before -> after the phases: RSS {nb['rss_mb']:.1f} -> {na['rss_mb']:.1f} MiB "
        f"({lk['rss_delta_mb']:+.1f}), FDs {nb['fds']} -> {na['fds']} "
        f"({'back' if lk['fds_back'] else 'NOT back'}), threads {nb['threads']} -> {na['threads']} "
        f"({'back' if lk['threads_back'] else 'NOT back'})"
    )
    fin = fa["final"]
    if fin.get("event") == "stopped":
        dropped = sum(fin["dropped"].values())
        ok = fin["received"] == fin["published"] + dropped
        lines.append(
            f"node accounting: received {fin['received']} = published {fin['published']} + dropped "
            f"{dropped} {fin['dropped']}: {'holds' if ok else 'BROKEN'}"
        )
    return lines


# --------------------------------------------------------------------------- plots


def plot_cdf(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = sorted({c["engine"] for c in result["cells"]})
    fig, axes = plt.subplots(1, len(engines), figsize=(6.5 * len(engines), 4.5), squeeze=False)
    rates = sorted(
        {c["fps_label"] for c in result["cells"]},
        key=lambda r: float("inf") if r == "unthrottled" else float(r),
    )
    ks = sorted({c["prompts"] for c in result["cells"]})
    styles = ["-", "--", ":", "-."]
    cmap = plt.get_cmap("tab10")
    for ax, engine in zip(axes[0], engines):
        for c in result["cells"]:
            if c["engine"] != engine or not c.get("samples_ms"):
                continue
            x = np.asarray(c["samples_ms"])
            y = np.arange(1, x.size + 1) / x.size
            ax.step(
                x,
                y,
                where="post",
                color=cmap(rates.index(c["fps_label"])),
                ls=styles[ks.index(c["prompts"]) % len(styles)],
                label=f"{c['fps_label']} fps, K={c['prompts']}",
            )
        ax.axvline(TARGET_P99_MS, color="k", ls=":", lw=1, label="33 ms")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("end-to-end latency, ms (frame in -> mask at subscriber)")
        ax.set_ylabel("fraction of frames")
        ax.set_title(f"engine: {engine}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c.get("stages")]
    labels = [f"{c['engine']} {c['fps_label']} fps K={c['prompts']}" for c in cells]
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(14, 0.35 * len(cells) + 1.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    left = np.zeros(len(cells))
    cmap = plt.get_cmap("tab10")
    for i, stage in enumerate(STAGE_ORDER):
        w = np.array([c["stages"].get(stage, {}).get("mean_ms", 0.0) for c in cells])
        ax.barh(labels, w, left=left, color=cmap(i), label=stage)
        left += w
    y = np.arange(len(cells))
    ax2.barh(y - 0.2, [c["p50_ms"] for c in cells], height=0.4, label="node p50 (end to end)")
    ax2.barh(
        y + 0.2,
        [c.get("baseline_p50_ms", np.nan) for c in cells],
        height=0.4,
        color="0.6",
        label="naive baseline p50 (compute only, same rate)",
    )
    ax2.set_xscale("log")
    ax2.set_xlabel("ms per frame (log)")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_xlabel("mean ms per frame, by stage (sums to the mean end-to-end latency)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=5, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_soak(soak: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = soak["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    a1.plot(t, [x["rss_mb"] for x in s], marker=".")
    a1.set_ylabel("node RSS, MiB")
    a1.grid(True, alpha=0.3)
    for q in ("p50_ms", "p99_ms"):
        a2.plot(t, [x.get(q, np.nan) for x in s], marker=".", label=q.replace("_ms", ""))
    a2.set_ylabel("end-to-end ms per interval")
    a2.set_xlabel("minutes")
    a2.legend()
    a2.grid(True, alpha=0.3)
    fig.suptitle(f"soak: {soak['engine']}, 15 fps, 3 prompts, {soak['minutes']:g} min")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_faults(fa: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"baseline": "tab:blue", "faults": "tab:red"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in ("baseline", "faults"):
        x = np.sort(
            np.concatenate(
                [np.asarray(p["samples_ms"], np.float64) for p in fa["phases"] if p["kind"] == kind]
                or [np.zeros(0)]
            )
        )
        if x.size:
            a1.step(x, np.arange(1, x.size + 1) / x.size, where="post", color=colors[kind], label=kind)
    a1.set_xlabel("end-to-end ms at the fast subscriber")
    a1.set_ylabel("fraction of frames")
    a1.set_title("all phases of each kind pooled")
    a1.grid(True, alpha=0.3)
    a1.legend()
    for p in fa["phases"]:
        for q, marker in (("p50_ms", "o"), ("p99_ms", "^")):
            if q in p:
                a2.plot(p["phase"] + 1, p[q], marker, color=colors[p["kind"]])
    a2.plot([], [], "ko", label="p50")
    a2.plot([], [], "k^", label="p99")
    a2.set_xlabel("phase, in run order (blue: baseline, red: faults)")
    a2.set_ylabel("ms")
    a2.set_title("per phase")
    a2.grid(True, alpha=0.3)
    a2.legend()
    fig.suptitle(f"subscriber faults: {fa['engine']}, {fa['fps']:g} fps, {fa['prompts']} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def json_name(result: dict[str, Any]) -> str:
    """bench.json for a sweep; soak.json or faults.json for a run of only that mode."""
    if not result.get("cells"):
        for mode in ("soak", "faults"):
            if mode in result:
                return f"{mode}.json"
    return "bench.json"


def markdown(result: dict[str, Any], image_prefix: str, notes: str = "") -> str:
    m, cfg = result["machine"], result["config"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `fluorosam-rt bench` from one run; every number below comes from "
        f"[`{image_prefix}{json_name(result)}`]({image_prefix}{json_name(result)}). Regenerate with",
        "",
        "```bash",
        ".venv/bin/fluorosam-rt bench --quick --out docs/bench --report docs/benchmarks.md   # a few minutes",
        ".venv/bin/fluorosam-rt bench --out docs/bench --report docs/benchmarks.md           # full sweep",
        ".venv/bin/fluorosam-rt bench --soak 10 --out docs/bench-soak --report docs/benchmarks-soak.md",
        ".venv/bin/fluorosam-rt bench --faults --out docs/bench-faults --report docs/benchmarks-faults.md",
        "```",
        "",
        "Absolute times belong to this machine under this load; they are not universal. Ratios "
        "measured in the same run (baseline / node, time / floor) travel better.",
        "",
        "## Conditions",
        "",
        f"- machine: {m['cpu']}, {m['cores']} logical cores, {m['platform']}",
        f"- load average (1, 5, 15 min) before: {m['load_before']}, after: {m.get('load_after')}",
        f"- torch {m['torch']} ({cfg['threads']} threads), onnxruntime {m.get('onnxruntime')}, "
        f"Python {m['python']}",
        f"- model: {cfg['model']}, weights: {cfg['weights']}",
        f"- frames: {cfg['frames']}; masks published at 1/{cfg['downsample']} size, "
        f"encoding {cfg['mask_encoding']}",
        (
            f"- phases: {result['faults']['phase_s']:g} s measured each after "
            f"{result['faults']['settle_s']:g} s to settle, {result['faults']['rounds']} rounds "
            f"in the order {result['faults']['order']} "
            f"(A baseline, B faults), {cfg['warmup_s']:g} s warm-up"
            if "faults" in result and not result.get("cells")
            else f"- per cell: {cfg['warmup_s']:g} s warm-up, {cfg['measure_s']:g} s measured"
            + (" (`--quick`)" if cfg["quick"] else "")
        ),
        f"- command: `{' '.join(result.get('command') or [])}`; wall time {result.get('elapsed_s', 0):.0f} s",
        f"- code: commit `{(result.get('code') or {}).get('commit')}`"
        + (" with local changes" if (result.get("code") or {}).get("dirty") else ""),
        "",
    ]
    if result.get("cells"):
        lines += [
            "## End-to-end latency per cell",
            "",
            "End to end = the replay source hands the frame to the node -> the subscriber process "
            "has the decoded masks, both on CLOCK_MONOTONIC. ms unless stated; `thru` is published "
            "frames per second; `in`/`pub`/`drop` are frames in the window (drops at the "
            "unthrottled rate are the latest-frame-wins policy at work); CPU % is the node "
            "process (100 % = one core); RSS is the node's peak in the window; `base p50` is "
            "the naive baseline (same frames, same rate, same machine, same run); `speedup` = base p50 / "
            "node p50; `/floor` = node p50 / compute floor.",
            "",
            _md_table(list(TABLE_COLUMNS), table_rows(result)),
            "",
            f"![latency CDF]({image_prefix}latency_cdf.png)",
            "",
            f"![per-stage breakdown]({image_prefix}stages.png)",
            "",
            "## Per-stage breakdown (mean ms)",
            "",
            "Stages: ingest (source -> node), queue (waiting for the inference thread), "
            "preprocess, encode (image), decode (all prompts, one batch), postprocess "
            "(upsample, threshold), geometry (outlines, instances, tools, tracking), "
            "publish_wait (waiting for and running the publisher), "
            "transport (ZeroMQ to the subscriber, decode there). They telescope, so their means "
            f"add up to the mean end to end; the largest error in this run is "
            f"{max((c.get('stage_sum_error_ms') or 0) for c in result['cells']):.4f} ms "
            f"(tolerance {cfg['stage_sum_tolerance_ms']} ms). The subscriber's wall-clock view "
            "of the same spans differs from the monotonic one by at most "
            f"{max((c.get('wall_vs_mono_max_abs_ms') or 0) for c in result['cells']):.3f} ms.",
            "",
        ]
        rows = []
        for c in result["cells"]:
            st = c.get("stages", {})
            rows.append(
                [c["engine"], c["fps_label"], str(c["prompts"])]
                + [_f(st.get(s, {}).get("mean_ms"), 2) for s in STAGE_ORDER]
                + [_f(c.get("stage_sum_mean_ms"), 2), _f(c.get("mean_ms"), 2)]
            )
        lines += [
            _md_table(["engine", "fps", "K", *STAGE_ORDER, "sum", "e2e mean"], rows),
            "",
            "## Naive baseline",
            "",
            "Per frame: preprocess, encode the image, then per prompt encode its text, decode it "
            "alone, pick the best mask, upsample and copy it out. PyTorch eager fp32, no cache, no "
            "batching, no sockets, on a worker thread like the node's inference. It runs just before "
            "each (engine, rate) group, paced at that rate (back to back for unthrottled), and is "
            "timed per frame from the frame's start: compute only, no queueing or transport, which "
            "favours it. The image is encoded once per frame, not once per prompt (also generous).",
            "",
            _md_table(
                ["before group", "prompts", "p50 ms", "p95 ms", "p99 ms", "max ms", "frames", "max fps"],
                [
                    [
                        g,
                        k,
                        _f(b["p50_ms"]),
                        _f(b["p95_ms"]),
                        _f(b["p99_ms"]),
                        _f(b["max_ms"]),
                        str(b["n"]),
                        _f(b.get("sustainable_fps"), 1),
                    ]
                    for g, per_k in result["baseline"].items()
                    for k, b in per_k.items()
                ],
            ),
            "",
            "## Floor",
            "",
        ]
        fl = result["floor"]
        lines += [
            f"fp32 matmul on this CPU in this run: {fl['cpu_gflops']:.1f} GFLOP/s sustained over the "
            f"best 0.1 s slice ({fl['matmul']['threads']} threads, {fl['matmul']['n']}^2 GEMMs for "
            f"{fl['matmul']['seconds']:.1f} s; {fl['matmul']['sustained_gflops']:.1f} GFLOP/s averaged "
            "over the whole run, load included). The floor uses the best slice, so it is a lower bound. "
            "FLOPs counted with torch.utils.flop_counter (matmuls and convolutions only, so the "
            "floor is a lower bound).",
            "",
            _md_table(
                [
                    "prompts",
                    "encode GFLOP",
                    "decode GFLOP",
                    "frame GFLOP",
                    "floor ms",
                    "baseline GFLOP",
                    "baseline / node FLOPs",
                ],
                [
                    [
                        k,
                        _f(v["encode_gflops"], 3),
                        _f(v["decode_gflops"], 3),
                        _f(v["gflops"], 3),
                        _f(v["floor_ms"], 2),
                        _f(v.get("baseline_gflops"), 3),
                        _f(v.get("baseline_over_node_flops"), 2),
                    ]
                    for k, v in fl["per_prompts"].items()
                ],
            ),
            "",
            "`baseline / node FLOPs` is how much of a speed-up over the naive baseline can come "
            "from doing less arithmetic alone (the text encoder and the prompt-independent part "
            "of the decoder run once instead of per prompt per frame); the rest has to come from "
            "overheads the baseline pays and the node does not.",
            "",
            "## Targets (15 fps, 3 prompts, best engine)",
            "",
        ]
        tg = result.get("targets", {})
        if "p99_le_33ms" in tg:
            p = tg["p99_le_33ms"]
            d = tg["no_drops_at_15fps"]
            lines += [
                f"- p99 end to end <= 33 ms: **{'met' if p['met'] else 'missed'}** "
                f"({p['value_ms']:.1f} ms on {tg['engine']}"
                + ("" if p["met"] else f", {p['over_by_ms']:.1f} ms over")
                + ")",
                f"- no drops at 15 fps: **{'met' if d['met'] else 'missed'}** ({d['dropped']} dropped"
                + (f": {d['by_reason']}" if d["by_reason"] else "")
                + ")",
            ]
            if "speedup_ge_5x" in tg:
                s = tg["speedup_ge_5x"]
                lines.append(
                    f"- >= 5x the naive baseline: **{'met' if s['met'] else 'missed'}** ({s['value']:.2f}x)"
                )
            lines.append(
                "- where the time goes (share of the mean): "
                + ", ".join(f"{k} {v}%" for k, v in tg["where_the_time_goes"].items())
            )
            lines.append("- latency flat over 10 minutes: see the soak section (`--soak 10`) when it was run")
        lines.append("")
    if result.get("compare"):
        from .compare import markdown_lines

        lines += markdown_lines(result, _md_table)
    if "geometry" in result:
        lines += geometry_markdown(result["geometry"], result["machine"])
    if "soak" in result:
        s = result["soak"]
        sm = s["summary"]
        lines += [
            "## Soak",
            "",
            f"{s['engine']}, 15 fps, 3 prompts, {s['minutes']:g} min, sampled every {s['interval_s']:g} s. "
            f"RSS after warm-up {_f(sm.get('rss_after_warmup_mb'))} MiB, max {_f(sm.get('rss_max_mb'))} MiB "
            f"(growth {_f(sm.get('rss_growth_pct'), 2)} %, target <= 5 %: "
            f"{'met' if sm.get('rss_growth_met') else 'missed'}); p99 first third "
            f"{_f(sm.get('p99_first_third_ms'))} ms, last third {_f(sm.get('p99_last_third_ms'))} ms "
            f"(drift {_f(sm.get('p99_drift_pct'), 1)} %); dropped {sm.get('dropped')} of "
            f"{sm.get('published', 0) + sm.get('dropped', 0)}.",
            "",
            f"![soak]({image_prefix}soak.png)",
            "",
        ]
    if "faults" in result:
        lines += faults_markdown(result["faults"], image_prefix)
    lines += [NOTES_BEGIN, notes.strip() or "(no notes yet)", NOTES_END, ""]
    return "\n".join(lines)


GEOMETRY_TARGET_P99_MS = 2.0


def geometry_lines(geo: dict[str, Any]) -> list[str]:
    """The geometry stage's headline numbers, one line each (console and report)."""
    out = []
    for key, what in (
        ("cost_model_masks", "the model's masks"),
        ("cost_model_masks_stride1", "the model's masks, every pixel traced"),
        ("cost_synthetic", "synthetic anatomy + K-wire"),
    ):
        c = geo.get(key)
        if not c:
            continue
        w, cpu = c["wall_ms"], c["cpu_ms"]
        parts = ", ".join(
            f"{k} {_f(w[k]['p50_ms'], 2)}/{_f(w[k]['p99_ms'], 2)}" for k in (*GEOMETRY_SUBSTAGES,)
        )
        met = "met" if cpu["p99_ms"] <= GEOMETRY_TARGET_P99_MS else "MISSED"
        total = f"{_f(w['total']['p50_ms'], 2)}/{_f(w['total']['p99_ms'], 2)}"
        out.append(
            f"geometry, K={c['prompts']} on {what}: CPU min {_f(c.get('cpu_min_ms'), 2)} ms, "
            f"p50 {_f(cpu['p50_ms'], 2)} ms, p99 {_f(cpu['p99_ms'], 2)} ms "
            f"(target <= {GEOMETRY_TARGET_P99_MS:g} ms: {met}); "
            f"wall p50/p99 ms per sub-stage: {parts}, total {total}; {c['instances_per_frame']:.1f} "
            f"instances, {c['contour_vertices_per_frame']:.0f} contour vertices per frame"
        )
    tr = geo.get("transport")
    if tr:
        f, g = tr["full"], tr["geometry"]
        out.append(
            f"geometry-only at K={tr['prompts']}, {tr['size']}² {tr['encoding']}: "
            f"{g['bytes_per_message']:.0f} B vs {f['bytes_per_message']:.0f} B per message "
            f"({tr['bytes_ratio']:.0f}x fewer); transport p50/p99 "
            f"{_f(g['transport_ms']['p50_ms'], 2)}/{_f(g['transport_ms']['p99_ms'], 2)} ms vs "
            f"{_f(f['transport_ms']['p50_ms'], 2)}/{_f(f['transport_ms']['p99_ms'], 2)} ms"
        )
    return out


GEOMETRY_SUBSTAGES = ("scene", "outlines", "tools", "tracking")
GEOMETRY_SETS = (
    ("cost_model_masks", "the model's masks, 1024²"),
    ("cost_model_masks_stride1", "the same, every pixel traced (trace_stride 1)"),
    ("cost_model_masks_d2", "the model's masks, published at 512² (downsample 2)"),
    ("cost_synthetic", "synthetic anatomy + ribs + K-wire, 1024²"),
)


def geometry_markdown(geo: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    lines = [
        "## Geometry: outlines, instances, tool tips, tracking",
        "",
        "Measured in the benchmark process on the node's own code (fluorosam_rt/bench/geometry.py), "
        f"on {machine['cores']} cores at load {machine['load_before']}. CPU is the thread's CPU time for "
        "the whole stage (what the stage needs); wall is per sub-stage and includes time the thread "
        "waited for a core on this shared machine.",
        "",
        "| mask set | prompts | CPU min ms | CPU p50 ms | CPU p99 ms | "
        + " | ".join(f"{s} p50/p99 ms" for s in (*GEOMETRY_SUBSTAGES, "total"))
        + " | instances/frame | vertices/frame |",
        "|---" * (7 + len(GEOMETRY_SUBSTAGES) + 1) + "|",
    ]
    for key, what in GEOMETRY_SETS:
        c = geo.get(key)
        if not c:
            continue
        w = c["wall_ms"]
        lines.append(
            f"| {what} | {c['prompts']} | {_f(c.get('cpu_min_ms'), 2)} | {_f(c['cpu_ms']['p50_ms'], 2)} | "
            f"{_f(c['cpu_ms']['p99_ms'], 2)} | "
            + " | ".join(
                f"{_f(w[s]['p50_ms'], 2)}/{_f(w[s]['p99_ms'], 2)}" for s in (*GEOMETRY_SUBSTAGES, "total")
            )
            + f" | {c['instances_per_frame']:.1f} | {c['contour_vertices_per_frame']:.0f} |"
        )
    lines += [
        "",
        f"Target: geometry, instances and tracking for K=10 <= {GEOMETRY_TARGET_P99_MS:g} ms p99 per frame.",
        "",
    ]
    fl = geo.get("flicker_anatomy")
    if fl:
        lines += [
            "### Flicker and smoothing",
            "",
            f"Demo sweep ({fl['frames']} frames), embedded model, prompts {', '.join(fl['prompts'])}, "
            "through Node._infer; flicker = 1 - IoU of consecutive masks. Smoothing is a causal EMA of "
            "the low-resolution logits (weight = share of the past): no frame is held back.",
            "",
            "| smoothing | flicker mean | "
            + " | ".join(f"{p} mean/p95" for p in fl["prompts"])
            + " | smoothing ms p50/p99 | postprocess ms p50 | geometry ms p50 |",
            "|---|---|" + "---|" * (len(fl["prompts"]) + 3),
        ]
        for wkey, r in fl["by_weight"].items():
            lines.append(
                f"| {wkey} | {r['flicker_mean']:.4f} | "
                + " | ".join(
                    f"{r['flicker'][p]['mean']:.4f}/{r['flicker'][p]['p95']:.4f}" for p in fl["prompts"]
                )
                + f" | {_f(r['smoothing_ms'].get('p50_ms'), 3)}/{_f(r['smoothing_ms'].get('p99_ms'), 3)}"
                f" | {_f(r['postprocess_ms'].get('p50_ms'), 2)} | {_f(r['geometry_ms'].get('p50_ms'), 2)} |"
            )
    tj = geo.get("tip_jitter")
    if tj:
        lines += [
            "",
            f"K-wire tip over the sweep's {tj['frames']} cameras (the wire moved into the field of view; "
            f"truth from the projection; the tip moves {tj['tip_motion_px_per_frame']:.2f} px per frame "
            "at 1024²), "
            f"low-resolution logits = signed distance + noise (sd {tj['noise_logit_sd']} logit per "
            f"{tj['low_res']}² pixel, spatially smoothed). Jitter = RMS of the frame-to-frame change of "
            "the tip error; lag = mean error along the tip's motion (negative: trailing).",
            "",
            "| smoothing | tips found | within 5 px | tip error p50/p95 px | jitter px | lag px "
            "| smoothing ms p50/p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        for wkey, r in tj["by_weight"].items():
            e = r["tip_error_px"]
            lines.append(
                f"| {wkey} | {r['tips_found']}/{tj['frames']} | {100 * r.get('within_5px', 0):.0f} % | "
                f"{_f(e.get('p50_ms'), 2)}/{_f(e.get('p95_ms'), 2)} | {_f(r['jitter_px'], 2)} | "
                f"{_f(r['lag_px'], 2)} | "
                f"{_f(r['smoothing_ms'].get('p50_ms'), 3)}/{_f(r['smoothing_ms'].get('p99_ms'), 3)} |"
            )
    tr = geo.get("transport")
    if tr:
        f, g = tr["full"], tr["geometry"]
        lines += [
            "",
            "### Geometry-only subscription",
            "",
            f"K={tr['prompts']} prompts, {tr['size']}² masks ({tr['encoding']}), {tr['messages']} messages "
            "over TCP to a subscriber process (bridge.Subscriber, decode included); "
            "transport = publish -> decoded.",
            "",
            "| stream | bytes/message | transport p50 ms | p99 ms | received |",
            "|---|---|---|---|---|",
            f"| full (masks + geometry) | {f['bytes_per_message']:.0f} | "
            f"{_f(f['transport_ms']['p50_ms'], 2)} | {_f(f['transport_ms']['p99_ms'], 2)} | "
            f"{f['received']} |",
            f"| geometry only | {g['bytes_per_message']:.0f} | {_f(g['transport_ms']['p50_ms'], 2)} | "
            f"{_f(g['transport_ms']['p99_ms'], 2)} | {g['received']} |",
            "",
            f"{tr['bytes_ratio']:.0f}x fewer bytes per frame.",
        ]
    lines.append("")
    return lines


def faults_markdown(fa: dict[str, Any], image_prefix: str) -> list[str]:
    sm = fa["summary"]
    return [
        "## Subscriber faults",
        "",
        f"One node ({fa['engine']}, {fa['fps']:g} fps replay, {fa['prompts']} prompts, mask stream over "
        f"{fa['transport']}) and one fast subscriber process for the whole run. Phases alternate: "
        + (
            "**baseline** (the fast subscriber plus three healthy peers: the same peer count as the "
            "faults, so the ratio measures the faults) "
            if fa.get("baseline_peers") == "healthy"
            else "**baseline** (only the fast subscriber) "
        )
        + "and **faults** (the same fast subscriber plus three "
        "processes: one reading one frame a second without draining its queue, one reconnecting in a "
        "loop, and one reading normally that is SIGKILLed halfway through the window). Rounds run "
        "AB, BA, AB, ... so a linear drift in the machine's load weighs on both conditions alike. "
        "Latency is end to end (frame handed to the node -> masks decoded by the fast subscriber); "
        "`pub` = frames that entered the node in the window and were published, `recv` = those the "
        "fast subscriber got, `missed` = the difference, "
        "`seq gaps` = jumps in the publisher's sequence number it saw; `pub_wait p99` = the node's "
        "publish_wait stage; CPU % of the node and of the fault subscribers together (100 % = one core); "
        "RSS, FDs and threads of the node at the window's end.",
        "",
        _md_table(list(FAULT_COLUMNS), fault_rows(fa)),
        "",
        *[f"- {line}" for line in fault_lines(fa)],
        "",
        f"Goal: faults / baseline <= {sm['target_ratio']:.2f} for p50 and p99 (issue 9: the node's latency "
        "for the others stays within 10 % of the baseline).",
        "",
        f"![subscriber faults]({image_prefix}faults.png)",
        "",
    ]


def _existing_notes(path: Path) -> str:
    if not path.is_file():
        return ""
    text = path.read_text()
    if NOTES_BEGIN in text and NOTES_END in text:
        return text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return ""


def write_all(result: dict[str, Any], out_dir: Path, report_md: Path | None = None) -> list[Path]:
    """JSON, PNGs and (optionally) the markdown report; returns the paths written."""
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    js = out_dir / json_name(result)
    js.write_text(json.dumps(result, indent=1))
    written.append(js)
    if result.get("cells"):
        plot_cdf(result, out_dir / "latency_cdf.png")
        plot_stages(result, out_dir / "stages.png")
        written += [out_dir / "latency_cdf.png", out_dir / "stages.png"]
    if "soak" in result:
        plot_soak(result["soak"], out_dir / "soak.png")
        written.append(out_dir / "soak.png")
    if "faults" in result:
        plot_faults(result["faults"], out_dir / "faults.png")
        written.append(out_dir / "faults.png")
    if report_md is not None:
        prefix = os.path.relpath(out_dir, report_md.parent).replace(os.sep, "/") + "/"
        report_md.parent.mkdir(parents=True, exist_ok=True)
        report_md.write_text(markdown(result, prefix, _existing_notes(report_md)))
        written.append(report_md)
    return written
