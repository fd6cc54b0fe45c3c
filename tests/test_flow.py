"""Flow tracking: the ring's contents and bounds, its statistics, and the live node's view of it."""

from __future__ import annotations

import itertools
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from bridge import SubscriberTimeout
from fluorosam_rt.service.control import CommandError, parse_request, send_command
from fluorosam_rt.service.flow import (
    MISSING,
    SEGMENTS,
    STAGES,
    FlowRing,
    MetricsServer,
    describe_ms,
    prometheus_text,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node


def stamps(base: int, steps: list[int]) -> dict[str, int]:
    """Wall-clock stamps for every stage: base, then cumulative steps (ns)."""
    t, out = base, {}
    for stage, d in zip(STAGES, [0, *steps]):
        t += d
        out[stage] = t
    return out


def test_ring_keeps_the_newest_frames_in_order_converted_to_the_monotonic_clock():
    ring = FlowRing(capacity=8)
    off = -1_000_000_000
    for i in range(20):
        ring.record(100 + i, stamps(10**12 + i * 10**6, list(range(1, len(STAGES)))), offset_ns=off)
    first, ids, ns = ring.rows()
    assert ring.count == 20
    assert first == 12
    assert ids.tolist() == list(range(112, 120))
    assert ns.shape == (8, len(STAGES))
    assert ns[0, 0] == 10**12 + 12 * 10**6 + off
    assert np.all(np.diff(ns, axis=1) > 0)
    # a poller asking from record 15 gets 15..19; from an overwritten index, what is left
    assert ring.rows(since=15)[1].tolist() == [115, 116, 117, 118, 119]
    assert ring.rows(since=3)[0] == 12
    assert ring.rows(last=2)[1].tolist() == [118, 119]
    assert ring.rows(since=20)[1].size == 0
    exp = ring.export(since=17, limit=2)
    assert (exp["first"], exp["next"]) == (18, 20)
    assert exp["frame_id"] == [118, 119]
    assert exp["clock"] == "CLOCK_MONOTONIC"
    assert exp["ns"][0][STAGES.index("received")] == ns[6, 1]


def test_missing_stages_are_left_out_of_that_segment_only():
    ring = FlowRing(capacity=4)
    t = stamps(10**12, [1000] * (len(STAGES) - 1))
    del t["encoded"]
    ring.record(1, t, offset_ns=0)
    _, _, ns = ring.rows()
    assert ns[0, STAGES.index("encoded")] == MISSING
    s = ring.summary()
    assert "encode" not in s
    assert "decode" not in s
    assert s["end_to_end"]["n"] == 1
    assert s["end_to_end"]["p50_ms"] == pytest.approx((len(STAGES) - 2) * 1000 / 1e6)


def test_summary_percentiles_match_numpy_and_segments_add_up():
    rng = np.random.default_rng(0)
    ring = FlowRing(capacity=500, window=300)
    steps = rng.integers(1_000, 5_000_000, size=(700, len(STAGES) - 1))
    for i, row in enumerate(steps):
        ring.record(i, stamps(10**15 + i * 10**8, row.tolist()), offset_ns=0)
    s = ring.summary()
    recent = steps[-300:] / 1e6  # summary covers the window, not the whole ring
    for j, (name, _, _) in enumerate(SEGMENTS):
        for q in (50, 95, 99):
            assert s[name][f"p{q}_ms"] == pytest.approx(np.percentile(recent[:, j], q), rel=1e-12)
        assert s[name]["max_ms"] == pytest.approx(recent[:, j].max())
        assert s[name]["n"] == 300
    e2e = recent[:, 1:].sum(axis=1)  # received -> published
    assert s["end_to_end"]["p99_ms"] == pytest.approx(np.percentile(e2e, 99), rel=1e-12)
    total = sum(s[name]["mean_ms"] for name, _, _ in SEGMENTS)
    assert total == pytest.approx(s["source_to_published"]["mean_ms"], rel=1e-9)
    assert describe_ms(np.array([1.0, 2.0, 3.0]))["p50_ms"] == 2.0


def test_recording_allocates_nothing_per_frame():
    ring = FlowRing(capacity=1024)
    t = stamps(10**15, [10_000] * (len(STAGES) - 1))
    for i in range(2048):  # wrap once so every row has been written
        ring.record(i, t)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(20_000):
            ring.record(i, t)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a per-frame allocation that is kept (a dict copy, a list append) would be >= 1 MB here
    assert after - before < 4096, after - before
    assert ring.count == 22_048


def test_a_wall_clock_step_is_counted():
    ring = FlowRing(capacity=4)
    t = stamps(10**15, [10] * (len(STAGES) - 1))
    ring.record(0, t, offset_ns=5_000)
    ring.record(1, t, offset_ns=5_100)  # jitter between the two clock reads: not a step
    assert ring.clock_steps == 0
    ring.record(2, t, offset_ns=5_000 + 3_600 * 10**9)  # the wall clock jumped an hour
    assert ring.clock_steps == 1


def test_prometheus_text_carries_the_summary_and_counters():
    ring = FlowRing(capacity=16)
    for i in range(10):
        ring.record(i, stamps(10**15 + i, [1_000_000 * (i + 1)] * (len(STAGES) - 1)), offset_ns=0)
    stats = {
        "received": 12,
        "published": 10,
        "dropped": {"superseded": 2},
        "fps": 14.5,
        "latency": ring.summary(),
    }
    text = prometheus_text(stats, stream="carm0")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines}
    assert values['fluorosam_frames_total{stream="carm0",fate="received"}'] == 12
    assert values['fluorosam_frames_total{stream="carm0",fate="dropped",reason="superseded"}'] == 2
    key = 'fluorosam_stage_seconds{stream="carm0",stage="end_to_end",quantile="0.99"}'
    assert values[key] == pytest.approx(stats["latency"]["end_to_end"]["p99_ms"] / 1e3)
    assert values['fluorosam_stage_seconds_count{stream="carm0",stage="decode"}'] == 10


def test_metrics_server_serves_metrics_only():
    server = MetricsServer(lambda: "fluorosam_fps 1\n")
    server.start()
    try:
        host, port = server.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
            assert r.status == 200
            assert r.read() == b"fluorosam_fps 1\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://{host}:{port}/", timeout=5)
        assert err.value.code == 404
    finally:
        server.stop()


def test_flow_command_is_validated():
    assert parse_request(b'{"cmd": "flow"}') == {"cmd": "flow", "since": 0, "limit": 4096}
    assert parse_request(b'{"cmd": "flow", "since": 5, "limit": 10}')["since"] == 5
    for bad in (
        b'{"cmd": "flow", "since": -1}',
        b'{"cmd": "flow", "since": "0"}',
        b'{"cmd": "flow", "since": true}',
        b'{"cmd": "flow", "limit": 100000}',
        b'{"cmd": "flow", "ids": []}',
    ):
        with pytest.raises(CommandError):
            parse_request(bad)


def test_live_node_flow_rows_match_what_the_subscriber_received(tmp_path, bundle):
    """On a real node: rows come out on the control socket, on the clock the subscriber shares."""
    for i in range(4):
        img = np.random.default_rng(i).integers(0, 4000, (96, 128), np.uint16)
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
    source = {"kind": "replay", "path": str(tmp_path), "fps": 15, "loop": True}
    ctl = f"ipc://{tmp_path}/control"
    got: dict[int, int] = {}
    with running_node(tmp_path, bundle, source, prompts=("lungs", "heart")) as (app, sub):
        deadline = time.monotonic() + 30
        while len(got) < 8 and time.monotonic() < deadline:
            try:
                msg = sub.receive(timeout=1.0, newest=False)
            except SubscriberTimeout:
                continue
            got[msg.frame_id] = time.monotonic_ns()
        flow = send_command(ctl, {"cmd": "flow"})["flow"]
        stats = send_command(ctl, {"cmd": "stats"})["stats"]
    assert len(got) >= 8
    rows = dict(zip(flow["frame_id"], flow["ns"]))
    pub = flow["stages"].index("published")
    for fid, recv in got.items():
        row = rows[fid]
        assert all(a <= b for a, b in itertools.pairwise(row[1:])), row  # received .. published ordered
        # the subscriber's receive, in another thread, on the same clock, comes after publish
        assert row[pub] <= recv < row[pub] + 5 * 10**9
    assert stats["flow"]["recorded"] >= len(got)
    assert stats["latency"]["end_to_end"]["n"] >= 1
    # once stopped, the live summary is exactly the statistics of the ring's raw rows
    final = app.node.flow.export()
    n = app.node.flow.window
    e2e = np.array([(r[pub] - r[1]) / 1e6 for r in final["ns"]][-n:])
    summary = app.node.stats()["latency"]["end_to_end"]
    assert summary["n"] == e2e.size
    assert summary["p99_ms"] == pytest.approx(np.percentile(e2e, 99), rel=1e-9)


def test_serve_exposes_prometheus_metrics_of_the_live_node(tmp_path, checkpoint):
    """`fluorosam-rt serve --metrics HOST:0` in its own process: scrape it while frames flow."""
    import json
    import os
    import subprocess

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((64, 64), 40 * i, np.uint8))
    ctl = f"ipc://{tmp_path}/control"
    cmd = [
        sys.executable,
        "-m",
        "fluorosam_rt.cli",
        "serve",
        "--source",
        f"replay:{tmp_path}@20",
        "--publish",
        f"ipc://{tmp_path}/masks",
        "--control",
        ctl,
        "--prompt",
        "lungs",
        "--checkpoint",
        str(checkpoint),
        "--keep-running",
        "--max-seconds",
        "120",
        "--metrics",
        "127.0.0.1:0",
    ]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(proc.stdout.readline())
        url = ready["metrics"]
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("/metrics")
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and 'stage="end_to_end"' not in text:
            time.sleep(0.5)
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode()
        assert 'fluorosam_frames_total{stream="carm0",fate="published"}' in text
        assert 'fluorosam_stage_seconds{stream="carm0",stage="end_to_end",quantile="0.99"}' in text
        assert send_command(ctl, {"cmd": "shutdown"})["ok"]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["received"] == final["published"] + sum(final["dropped"].values())
