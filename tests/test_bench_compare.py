"""Two models in one ``fluorosam-rt bench`` run (issue 16: v1 and v2 side by side).

The pairing and ratio arithmetic is tested in test_bench.py; here: the command's one-line errors
for a comparison it cannot run, the order the sweep measures the two models in (each group of the
second model right after the first's, each after its own baseline), and one tiny real run of two
models through real node processes (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fluorosam_rt.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--compare-checkpoint", "/nonexistent/v2.safetensors"], "no checkpoint file /nonexistent/v2"),
        (["--compare-checkpoint", "embedded", "--soak", "1"], "does not apply to --soak or --faults"),
        (["--compare-checkpoint", "embedded", "--faults"], "does not apply to --soak or --faults"),
    ],
)
def test_a_comparison_the_bench_cannot_run_is_one_line_and_exit_2(tmp_path, args, says):
    r = _bench("--out", str(tmp_path / "b"), *args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "b" / "bench.json").exists()  # refused before minutes of setup


def test_second_model_runs_right_after_the_first_for_every_engine_and_rate(monkeypatch, tmp_path):
    """Recorders in place of processes: the call order is the claim."""
    import fluorosam_rt.bench.baseline as baseline
    import fluorosam_rt.bench.floor as floor
    import fluorosam_rt.bench.report as report
    import fluorosam_rt.bench.runner as runner
    from fluorosam_rt.bench.harness import BenchOptions

    calls: list[tuple] = []
    models = {"A": NS(model=NS(cfg=NS(name="v1")), text_encoder=None)}
    models["B"] = NS(model=NS(cfg=NS(name="v2")), text_encoder=None)

    def prepare_model(opts, work, checkpoint=None):
        calls.append(("prepare", checkpoint))
        return models["B"], checkpoint, f"checkpoint {checkpoint}"

    def resolve_engines(opts, model):
        return list(opts.engines), {}

    class Baseline:
        def __init__(self, model, text_encoder):
            self.name = model.cfg.name

    def time_baseline(base, frames, texts, n, rate):
        calls.append(("baseline", base.name, rate, len(texts)))
        return {"p50_ms": 10.0, "p99_ms": 20.0}

    def run_group(work, opts, engine, rate, frames_dir, checkpoint, progress, label=""):
        calls.append(("group", label, engine, rate, checkpoint))
        cells = [
            {"engine": engine, "fps": rate, "fps_label": runner.fps_label(rate), "prompts": k, "p50_ms": 5.0}
            for k in opts.prompts
        ]
        return cells, {"published": 1}

    monkeypatch.setattr(runner, "prepare_model", prepare_model)
    monkeypatch.setattr(runner, "resolve_engines", resolve_engines)
    monkeypatch.setattr(runner, "run_group", run_group)
    monkeypatch.setattr(baseline, "NaiveBaseline", Baseline)
    monkeypatch.setattr(baseline, "time_baseline", time_baseline)
    monkeypatch.setattr(
        floor, "floor_report", lambda model, prompts, seconds, text_encoder=None: {"per_prompts": {}}
    )
    monkeypatch.setattr(report, "targets", lambda result: {})

    opts = BenchOptions(
        out_dir=tmp_path,
        engines=["torch", "onnxruntime"],
        rates=[15.0, 0.0],
        prompts=[3, 10],
        compare_checkpoint="v2.safetensors",
        geometry=False,
    )
    result: dict = {"config": {}}
    runner.run_sweep(
        tmp_path, opts, models["A"], None, "embedded", tmp_path, [], result, progress=lambda s: None
    )

    assert calls[0] == ("prepare", "v2.safetensors")
    groups = [c for c in calls if c[0] == "group"]
    want = [
        ("group", label, engine, rate, ckpt)
        for engine in ("torch", "onnxruntime")
        for rate in (15.0, 0.0)
        for label, ckpt in (("A", None), ("B", "v2.safetensors"))
    ]
    assert groups == want
    # each group is preceded by its own model's baseline at the group's rate, one per prompt count
    for i, c in enumerate(calls):
        if c[0] == "group":
            model = "v1" if c[1] == "A" else "v2"
            assert calls[i - 2 : i] == [("baseline", model, c[3], 3), ("baseline", model, c[3], 10)]
    assert result["compare"]["model"] == "v2"
    assert len(result["side_by_side"]) == 2 * 2 * 2  # engines x rates x prompt counts, paired


@pytest.mark.slow
def test_tiny_real_run_of_two_models_reports_both_side_by_side(tmp_path, checkpoint):
    """Two real node processes per group (the shared test model as both A and B), frames end to end."""
    out = tmp_path / "bench"
    r = _bench(
        "--quick",
        "--engines",
        "torch",
        "--rates",
        "15",
        "--prompts",
        "1",
        "--warmup",
        "1",
        "--measure",
        "3",
        "--baseline-frames",
        "2",
        "--floor-seconds",
        "0.2",
        "--frame-size",
        "128",
        "--frames",
        "2",
        "--no-geometry",
        "--checkpoint",
        str(checkpoint),
        "--compare-checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "bench.json").read_text())
    rows = doc["side_by_side"]
    assert [(x["engine"], x["prompts"]) for x in rows] == [("torch", 1)]
    assert rows[0]["first_p50_ms"] > 0
    assert rows[0]["second_p50_ms"] > 0
    assert rows[0]["ratio_p50_ms"] == pytest.approx(rows[0]["second_p50_ms"] / rows[0]["first_p50_ms"])
    assert doc["compare"]["cells"]
    assert doc["cells"]
