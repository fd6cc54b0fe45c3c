"""`fluorosam-rt bench --faults`: the run goes end to end on the real node, with real sockets and
real fault processes, and writes a well-formed result. Correctness only: the latency ratio is
what the benchmark measures on a quiet machine, so no timing is asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fluorosam_rt.bench.faults import phase_plan
from fluorosam_rt.bench.harness import BenchOptions
from fluorosam_rt.bench.run import run_bench

sys.path.insert(0, str(Path(__file__).parent))
from outside_counts import assert_counted_from_outside


def test_phase_plan_alternates_abba():
    assert [k for _, k in phase_plan(2)] == ["baseline", "faults", "faults", "baseline"]
    assert [r for r, _ in phase_plan(2)] == [0, 0, 1, 1]


def test_tiny_faults_run_measures_both_phases_and_keeps_the_books(tmp_path, checkpoint):
    md = tmp_path / "docs" / "benchmarks-faults.md"
    opts = BenchOptions(
        out_dir=tmp_path / "out",
        warmup_s=1.0,
        frame_size=128,
        n_frames=3,
        checkpoint=str(checkpoint),
        faults=True,
        faults_phase_s=2.0,
        faults_rounds=1,
        faults_settle_s=0.5,
        faults_engine="torch",
        report=md,
        argv=["fluorosam-rt", "bench", "--faults", "(test)"],
    )
    run_bench(opts, progress=lambda *_: None)
    saved = json.loads((tmp_path / "out" / "faults.json").read_text())
    fa = saved["faults"]
    assert (fa["engine"], fa["fps"], fa["prompts"], fa["order"]) == ("torch", 15.0, 3, "AB")
    assert [p["kind"] for p in fa["phases"]] == ["baseline", "faults"]
    for p in fa["phases"]:
        # every frame that entered in the window is published, dropped or still in flight
        assert p["frames_in"] == p["published"] + p["dropped"] + p["in_flight_delta"]
        assert p["dropped"] == sum(p["dropped_by_reason"].values())
        assert p["published"] > 0
        assert p["received_by_fast_subscriber"] == len(p["samples_ms"]) > 0
        assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert p["published_in_window"] >= p["received_by_fast_subscriber"]
        assert (
            p["not_received_by_fast_subscriber"]
            == p["published_in_window"] - p["received_by_fast_subscriber"]
        )
        assert p["seq_gaps"] >= 0
        assert {"rss_mb", "fds", "threads"} <= set(p["node_at_window_end"])
    base, faulted = fa["phases"]
    control = base["fault_subscribers"]  # the baseline's healthy peers: same count, no faults
    assert set(control) == {"healthy1", "healthy2", "healthy3"}
    assert all(c["exit_code"] == 0 and c["received"] >= 1 for c in control.values())
    fs = faulted["fault_subscribers"]
    assert set(fs) == {"slow", "reconnect", "dying"}
    assert fs["dying"]["exit_code"] == -9
    assert fs["dying"]["killed_at_s"] is not None
    assert fs["slow"]["exit_code"] == 0
    assert fs["slow"]["received"] >= 1
    assert fs["reconnect"]["exit_code"] == 0
    assert fs["reconnect"]["reconnects"] >= 1
    # the node's books balance at the end: received = published + dropped (by reason)
    final = fa["final"]
    assert final["event"] == "stopped"
    assert final["in_flight"] == 0
    assert final["received"] == final["published"] + sum(final["dropped"].values())
    assert 0 < final["subscriber"]["received"] <= final["published"]
    assert_counted_from_outside(final)  # source emitted and subscriber seq, not the node's own books
    sm = fa["summary"]
    for kind in ("baseline", "faults"):
        assert sm[kind]["phases"] == 1
        assert sm[kind]["received_by_fast_subscriber"] > 0
    assert sm["ratio_p50"] == sm["faults"]["p50_ms"] / sm["baseline"]["p50_ms"]
    assert sm["ratio_p99"] == sm["faults"]["p99_ms"] / sm["baseline"]["p99_ms"]
    assert isinstance(sm["ratio_p50_met"], bool)
    assert sm["target_ratio"] == 1.10
    assert {"fds_delta", "threads_delta", "rss_delta_mb"} <= set(sm["leaks"])
    assert {"fds", "threads", "rss_mb"} <= set(fa["node_before"]) & set(fa["node_after"])
    assert (tmp_path / "out" / "faults.png").read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert "## Subscriber faults" in text
    assert "faults / baseline p99" in text
    assert "](../out/faults.json)" in text
    # re-rendering from the JSON alone gives the same table and plot without measuring
    from fluorosam_rt.cli import main

    again = tmp_path / "again"
    assert main(["bench", "--render", str(tmp_path / "out" / "faults.json"), "--out", str(again)]) == 0
    assert json.loads((again / "faults.json").read_text())["faults"]["summary"] == fa["summary"]
    assert (again / "faults.png").is_file()
