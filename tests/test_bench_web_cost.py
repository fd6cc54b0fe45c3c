"""The web viewer's cost benchmark (fluorosam_rt/bench/web_cost.py): its phase order and its
arithmetic on made-up phases (cheap), and one tiny real run (slow)."""

from __future__ import annotations

import json
import shlex

import pytest

from fluorosam_rt.bench import web_cost


def _phase(kind: str, rnd: int, samples: list[float], **extra) -> dict:
    row = {"kind": kind, "round": rnd, "published": len(samples), "dropped": 0, "cpu_pct_node": 50.0}
    row |= {"samples_ms": samples, "p50_ms": sorted(samples)[len(samples) // 2], "p99_ms": max(samples)}
    return row | extra


def test_phase_order_is_abba():
    assert [k[0] for _, k in web_cost.phase_plan(4)] == list("bvvbbvvb")
    assert [r for r, _ in web_cost.phase_plan(2)] == [0, 0, 1, 1]


def test_summary_adds_up_and_judges_the_target():
    viewer_extra = {"cpu_pct_viewer": 8.0, "viewer": {"client": {"frames": 100}}}
    phases = [
        _phase("baseline", 0, [10.0] * 99 + [20.0]),
        _phase("viewer", 0, [11.0] * 99 + [23.0], **viewer_extra),
        _phase("viewer", 1, [11.0] * 99 + [23.0], **viewer_extra),
        _phase("baseline", 1, [10.0] * 99 + [20.0]),
    ]
    soak = [{"t_s": 10.0 * (i + 1), "viewer_rss_mb": 60.0 + (i > 0), "cpu_pct_viewer": 5.0} for i in range(6)]
    s = web_cost.summary(phases, soak)
    assert s["baseline"]["n"] == 200
    assert s["viewer"]["n"] == 200
    assert s["added_p50_ms"] == pytest.approx(1.0)
    assert 0 < s["added_p99_ms"] <= 3.0
    assert s["added_p99_met"]
    assert [r["added_p50_ms"] for r in s["per_round"]] == [pytest.approx(1.0)] * 2
    assert s["viewer"]["client_frames"] == 200
    assert s["soak"]["rss_growth_second_half_mb"] == pytest.approx(0.0)
    assert s["soak"]["rss_first_mb"] == 60.0
    assert s["soak"]["rss_max_mb"] == 61.0
    assert s["verdict"] == "met"
    phases[1]["samples_ms"] = [11.0] * 90 + [40.0] * 10  # a viewer that costs 20 ms at p99
    assert not web_cost.summary(phases, [])["added_p99_met"]
    assert web_cost.summary(phases, [])["verdict"] == "not met"
    phases[3]["p99_ms"] = 31.0  # baseline phases 11 ms apart at p99: a 5 ms effect is not resolvable
    assert web_cost.summary(phases, [])["verdict"].startswith("inconclusive")


@pytest.mark.slow
def test_tiny_real_run(tmp_path):
    """The whole harness on the real node, viewer process and client: 1 round of 3 s phases."""
    args = shlex.split("--rounds 1 --phase-s 3 --settle-s 2 --warmup 2 --frame-size 256 --engine torch")
    rc = web_cost.main([*args, "--soak-minutes", "0.2", "--soak-interval", "4", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "web_cost.json").read_text())
    kinds = [p["kind"] for p in result["phases"]]
    assert kinds == ["baseline", "viewer"]
    viewer = result["phases"][1]
    assert viewer["viewer"]["client"]["frames"] > 0
    assert viewer["viewer"]["exit_code"] == 0
    assert result["summary"]["baseline"]["n"] > 0
    assert result["summary"]["viewer"]["n"] > 0
    assert len(result["soak"]) >= 2
    assert all(s["viewer_rss_mb"] > 10 for s in result["soak"])
