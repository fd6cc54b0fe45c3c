"""bench-cine (issue 20, item 7): an XA cine through the real node, uncompressed vs JPEG Lossless.

The cheap test sends a tiny cine (64x64, 6 frames) in both syntaxes with dcmtk's storescu to a
real ``fluorosam-rt serve`` process and checks, from the JSON the command writes, that every
frame was published or dropped with a reason and that the subscriber holds every published one.
The accounting itself is checked on doctored inputs: a message that went missing must open it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from fluorosam_rt.bench.cine import (
    COMPRESSED,
    UNCOMPRESSED,
    CineOptions,
    account,
    cine_pixels,
    encode_cine,
    latencies,
    run_cine_benchmark,
    write_cine,
)

SUMMARY_FIELDS = (
    "sent",
    "emitted",
    "received",
    "published",
    "dropped",
    "dropped_by_reason",
    "subscriber_received",
    "accounting_closed",
    "frame_ms_p50",
    "frame_ms_p99",
    "cine_ms_p50",
    "cine_ms_p99",
    "node_ms_p50",
    "node_ms_p99",
    "source_to_subscriber_ms_p99",
    "play_start_ms_median",
    "decode_ms_p50",
    "decode_ms_p99",
    "object_ingest_ms",
    "decoder",
    "ratio",
    "bytes",
    "latency_samples",
)


def _tools() -> None:
    for tool in ("storescu", "dcmcjpeg"):
        assert shutil.which(tool), f"{tool} (dcmtk) is needed: scripts/test.sh installs it"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, checkpoint):
    """One bench-cine run, as the command runs it: 6-frame 64x64 cines, both syntaxes, ABBA x 2."""
    _tools()
    out = tmp_path_factory.mktemp("cine") / "bench_cine.json"
    opts = CineOptions(
        size=64,
        frames=6,
        bits=12,
        fps=30.0,
        engine="torch",
        checkpoint=str(checkpoint),
        repeats=2,
        warmup_frames=2,
        json_path=str(out),
        timeout_s=60,
    )
    result = run_cine_benchmark(opts, progress=lambda _line: None)
    return result, json.loads(out.read_text())


def test_tiny_cine_every_frame_accounted_in_both_syntaxes(tiny):
    result, written = tiny
    assert written["accounting_closed"] is True
    assert written["compared"] == {"baseline": UNCOMPRESSED, "compressed": COMPRESSED}
    assert written["config"]["order"] == [
        f"{UNCOMPRESSED}#0",
        f"{COMPRESSED}#0",
        f"{COMPRESSED}#1",
        f"{UNCOMPRESSED}#1",
    ]
    for key in (UNCOMPRESSED, COMPRESSED):
        s = written["syntaxes"][key]
        missing = [f for f in SUMMARY_FIELDS if f not in s]
        assert not missing, f"{key}: no {missing} in the JSON"
        assert s["sent"] == s["emitted"] == s["received"] == 12  # 2 runs x 6 frames
        assert s["published"] + s["dropped"] == s["received"]
        assert sum(s["dropped_by_reason"].values()) == s["dropped"]
        assert s["subscriber_received"] == s["published"] >= 1
        assert s["latency_samples"] == s["published"]
        for name in ("frame", "cine", "node"):
            assert 0 < s[f"{name}_ms_p50"] <= s[f"{name}_ms_p99"], (key, name, s)
        assert s["frame_ms_p99"] >= s["node_ms_p99"] * 0.999  # the subscriber is downstream
        for c in written["cines"][key]:
            acc = c["accounting"]
            assert acc["closed"], acc
            assert not acc["problems"], acc
            assert len(acc["not_published_frame_indices"]) == acc["dropped"]
    assert written["syntaxes"][UNCOMPRESSED]["decoder"] == "pydicom"
    assert written["syntaxes"][COMPRESSED]["decoder"] not in ("", "pydicom")
    add = written["p99_added_by_decoding_ms"]
    for name in ("frame", "cine", "node", "source_to_subscriber"):
        want = (
            written["syntaxes"][COMPRESSED][f"{name}_ms_p99"]
            - written["syntaxes"][UNCOMPRESSED][f"{name}_ms_p99"]
        )
        assert add[name] == pytest.approx(want, abs=0.011)
    assert len(written["p99_added_by_decoding_per_run_ms"]) == 2
    assert written["warmup"]["accounting"]["closed"]
    assert "load_before" in written["machine"]
    assert "load_after" in written["machine"]
    assert result["node_final"]["source_emitted"] == 2 + 24  # warm-up + 4 cines, counted by the node
    assert written["node_final_closed"] is True


# --------------------------------------------------------------------------- the accounting


def _counts(emitted=0, received=0, published=0, dropped=None, rejected=None) -> dict:
    return {
        "emitted": emitted,
        "received": received,
        "published": published,
        "dropped": dict(dropped or {}),
        "rejected": dict(rejected or {}),
    }


def _rows(indices) -> list[dict]:
    return [{"frame_index": i} for i in indices]


BEFORE = _counts(10, 10, 8, {"superseded": 2})


def test_account_closes_when_every_frame_is_published_or_dropped():
    after = _counts(16, 16, 12, {"superseded": 4})
    acc = account(6, BEFORE, after, _rows([0, 2, 3, 5]), lost=0)
    assert acc["closed"], acc["problems"]
    assert acc["dropped_by_reason"] == {"superseded": 2}
    assert acc["not_published_frame_indices"] == [1, 4]


@pytest.mark.parametrize(
    ("after", "rows", "lost", "problem"),
    [
        # the node published 4 but the subscriber holds 3: a message went missing
        (_counts(16, 16, 12, {"superseded": 4}), [0, 2, 3], 0, "subscriber holds 3 messages"),
        # a frame the source emitted that the node never counted
        (_counts(16, 15, 12, {"superseded": 3}), [0, 2, 3, 5], 0, "node received 5"),
        # a frame neither published nor dropped
        (_counts(16, 16, 12, {"superseded": 3}), [0, 2, 3, 5], 0, "published 4 + dropped 1"),
        # the source played fewer frames than were sent
        (_counts(15, 15, 12, {"superseded": 3}), [0, 2, 3, 5], 0, "source emitted 5 of 6"),
        # one index twice (and so one index missing that no drop accounts for)
        (_counts(16, 16, 12, {"superseded": 4}), [0, 2, 2, 5], 0, "duplicate"),
        # seq gaps at the subscriber
        (_counts(16, 16, 12, {"superseded": 4}), [0, 2, 3, 5], 1, "lost messages"),
    ],
)
def test_account_opens_on_a_missing_or_extra_frame(after, rows, lost, problem):
    acc = account(6, BEFORE, after, _rows(rows), lost=lost)
    assert not acc["closed"]
    assert any(problem in p for p in acc["problems"]), acc["problems"]


def test_latencies_use_the_message_stamps_and_the_cine_clock():
    t_send = 1_000_000_000
    rows = [
        {"frame_index": 3, "t": {"source": t_send + 150e6, "received": t_send + 150e6,
                                  "published": t_send + 170e6}, "recv_ns": t_send + 172e6},
    ]  # fmt: skip
    lat = latencies(rows, t_send, fps=30.0)
    assert lat["frame"] == [pytest.approx(22.0)]
    assert lat["node"] == [pytest.approx(20.0)]
    assert lat["cine"] == [pytest.approx(172.0 - 100.0)]  # frame 3 was due 100 ms after the send began
    assert lat["play_start"] == [pytest.approx(50.0)]


# --------------------------------------------------------------------------- the cine itself


def test_cine_file_is_a_multiframe_xa_in_both_syntaxes(tmp_path):
    _tools()
    px, _ = cine_pixels(32, 4, 14)
    assert px.dtype == np.uint16
    assert px.max() < 2**14
    assert len({p.tobytes() for p in px}) == 4
    write_cine(tmp_path / "raw.dcm", px, 14, 30.0)
    encode_cine(tmp_path / "raw.dcm", COMPRESSED, tmp_path / "c.dcm")
    ds = pydicom.dcmread(tmp_path / "c.dcm")
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.70"
    assert int(ds.NumberOfFrames) == 4
    assert int(ds.BitsStored) == 14
    assert float(ds.FrameTime) == pytest.approx(1000 / 30, abs=1e-3)
    np.testing.assert_array_equal(ds.pixel_array, px)  # lossless


def test_cli_refuses_bad_syntaxes_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fluorosam_rt.cli", "bench-cine", "--syntaxes", "explicit,mpeg2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "bench-cine: unknown cine syntax 'mpeg2'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_size_cine_through_the_embedded_model(tmp_path):
    """The command's own setting at reduced length: 1024x1024 12-bit at 30 fps, 3 prompts,
    embedded model on onnxruntime; the accounting closes and decoding's cost is stated."""
    _tools()
    out = tmp_path / "bench_cine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fluorosam_rt.cli", "bench-cine", "--frames", "30", "--repeats", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads(out.read_text())
    assert written["accounting_closed"]
    assert written["config"]["prompts"] == ["lungs", "heart", "spine"]
    for key in (UNCOMPRESSED, COMPRESSED):
        assert written["syntaxes"][key]["sent"] == written["syntaxes"][key]["received"] == 30
    assert all(v is not None for v in written["p99_added_by_decoding_ms"].values())
    assert "p99 added by decoding" in proc.stdout
