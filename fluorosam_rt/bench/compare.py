"""Two models in one ``fluorosam-rt bench`` run: cells paired by (engine, rate, prompts), and ratios.

Issue 16 asks for v1 and v2 side by side in one run. The runner measures the comparison model's
group right after the first model's for the same engine and rate, so both see the same machine
minutes apart; the ratios (second / first) are what travels to other machines and loads. The
latency targets of the v2 issue (15 fps: K = 3 p99 <= 33 ms, K = 10 p99 <= 50 ms) are reported
for both models.
"""

from __future__ import annotations

from typing import Any

# 15 fps targets per prompt count (issue 16, point 2)
P99_TARGETS_MS = {3: 33.0, 10: 50.0}
TARGET_FPS = 15.0
_MEASURES = ("p50_ms", "p99_ms", "throughput_fps", "cpu_pct_node")


def _key(c: dict[str, Any]) -> tuple[str, str, int]:
    return (c["engine"], c["fps_label"], int(c["prompts"]))


def _compute_ms(c: dict[str, Any]) -> float | None:
    st = c.get("stages", {})
    parts = [st[s]["mean_ms"] for s in ("encode", "decode", "postprocess") if s in st]
    return sum(parts) if parts else None


def side_by_side(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (engine, rate, prompts) measured for both models, with second / first ratios.

    Cells without latencies (nothing reached the subscriber) give ``None`` ratios, never a
    made-up number.
    """
    by_key = {_key(c): c for c in second}
    rows = []
    for a in first:
        b = by_key.get(_key(a))
        if b is None:
            continue
        row: dict[str, Any] = {
            "engine": a["engine"],
            "fps_label": a["fps_label"],
            "prompts": int(a["prompts"]),
        }
        pairs = {m: (a.get(m), b.get(m)) for m in _MEASURES}
        pairs["compute_ms"] = (_compute_ms(a), _compute_ms(b))
        for m, (va, vb) in pairs.items():
            row[f"first_{m}"], row[f"second_{m}"] = va, vb
            row[f"ratio_{m}"] = vb / va if va and vb is not None else None
        rows.append(row)
    return rows


def latency_targets(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 16's 15 fps p99 targets for one model's cells (best engine per prompt count)."""
    out: dict[str, Any] = {}
    for k, target in P99_TARGETS_MS.items():
        cand = [c for c in cells if c["fps"] == TARGET_FPS and c["prompts"] == k and "p99_ms" in c]
        if not cand:
            continue
        best = min(cand, key=lambda c: c["p99_ms"])
        out[f"K={k}"] = {
            "engine": best["engine"],
            "p99_ms": best["p99_ms"],
            "target_ms": target,
            "met": best["p99_ms"] <= target,
        }
    return out


def _f(v: Any, nd: int = 1, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.{nd}f}{suffix}"


COLUMNS = (
    "engine",
    "fps",
    "K",
    "p50 A",
    "p50 B",
    "p50 B/A",
    "p99 A",
    "p99 B",
    "p99 B/A",
    "compute A",
    "compute B",
    "compute B/A",
    "thru A",
    "thru B",
    "CPU% A",
    "CPU% B",
)


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            r["engine"],
            r["fps_label"],
            str(r["prompts"]),
            _f(r["first_p50_ms"]),
            _f(r["second_p50_ms"]),
            _f(r["ratio_p50_ms"], 2, "x"),
            _f(r["first_p99_ms"]),
            _f(r["second_p99_ms"]),
            _f(r["ratio_p99_ms"], 2, "x"),
            _f(r["first_compute_ms"]),
            _f(r["second_compute_ms"]),
            _f(r["ratio_compute_ms"], 2, "x"),
            _f(r["first_throughput_fps"]),
            _f(r["second_throughput_fps"]),
            _f(r["first_cpu_pct_node"], 0),
            _f(r["second_cpu_pct_node"], 0),
        ]
        for r in rows
    ]


def model_lines(result: dict[str, Any]) -> list[str]:
    """'A: ... / B: ...' descriptions and the targets of both models, plain text."""
    cmp = result["compare"]
    first = {
        "model": result["config"]["model"],
        "weights": result["config"]["weights"],
        "targets": cmp["first_targets"],
    }
    lines = []
    for name, m in (("A", first), ("B", cmp)):
        t = m.get("targets") or {}
        met = "; ".join(
            f"15 fps {k} p99 {v['p99_ms']:.1f} ms ({v['engine']}) <= {v['target_ms']:g}: "
            + ("met" if v["met"] else "missed")
            for k, v in t.items()
        )
        lines.append(f"{name}: {m['model']}, {m['weights']}" + (f"; {met}" if met else ""))
    return lines


def markdown_lines(result: dict[str, Any], md_table: Any) -> list[str]:
    """The report's 'Models side by side' section."""
    rows = result.get("side_by_side") or []
    return [
        "## Models side by side",
        "",
        "Each (engine, rate) group of model B ran right after model A's, on the same frames and "
        "machine; ratios are B / A (below 1: B is faster). `compute` is the node's mean "
        "encode + decode + postprocess per frame.",
        "",
        *(f"- {line}" for line in model_lines(result)),
        "",
        md_table(list(COLUMNS), table_rows(rows)),
        "",
    ]
