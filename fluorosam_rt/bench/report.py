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
    if "soak" in result:
        s = result["soak"]["summary"]
        console.print(f"soak: {json.dumps(s)}")


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


# --------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(result: dict[str, Any], image_prefix: str, notes: str = "") -> str:
    m, cfg = result["machine"], result["config"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `fluorosam-rt bench` from one run; every number below comes from "
        f"[`{image_prefix}bench.json`]({image_prefix}bench.json). Regenerate with",
        "",
        "```bash",
        ".venv/bin/fluorosam-rt bench --quick --out docs/bench --report docs/benchmarks.md   # a few minutes",
        ".venv/bin/fluorosam-rt bench --out docs/bench --report docs/benchmarks.md           # full sweep",
        ".venv/bin/fluorosam-rt bench --soak 10 --out docs/bench-soak --report docs/benchmarks-soak.md",
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
        f"- per cell: {cfg['warmup_s']:g} s warm-up, {cfg['measure_s']:g} s measured"
        + (" (`--quick`)" if cfg["quick"] else ""),
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
            "(upsample, threshold), publish_wait (waiting for and running the publisher), "
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
    lines += [NOTES_BEGIN, notes.strip() or "(no notes yet)", NOTES_END, ""]
    return "\n".join(lines)


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
    name = "soak" if "soak" in result and not result.get("cells") else "bench"
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(result, indent=1))
    written.append(js)
    if result.get("cells"):
        plot_cdf(result, out_dir / "latency_cdf.png")
        plot_stages(result, out_dir / "stages.png")
        written += [out_dir / "latency_cdf.png", out_dir / "stages.png"]
    if "soak" in result:
        plot_soak(result["soak"], out_dir / "soak.png")
        written.append(out_dir / "soak.png")
    if report_md is not None:
        prefix = os.path.relpath(out_dir, report_md.parent).replace(os.sep, "/") + "/"
        report_md.parent.mkdir(parents=True, exist_ok=True)
        report_md.write_text(markdown(result, prefix, _existing_notes(report_md)))
        written.append(report_md)
    return written
