"""`segment --engine`, `engine list|build|bench` and the GPU check script, run as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fluorosam_rt.bundle import ASSETS_DIR
from fluorosam_rt.cli import main

SAMPLE = ASSETS_DIR / "samples" / "chest_pa_2c35005f.png"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_env(tmp_path_factory, monkeypatch) -> Path:
    d = tmp_path_factory.getbasetemp() / "engine-cache-shared"
    monkeypatch.setenv("FLUOROSAM_RT_ENGINE_CACHE", str(d))
    return d


def _segment(checkpoint: Path, out: Path, engine: str) -> None:
    args = ["segment", str(SAMPLE), "--prompt", "left lung", "--prompt", "heart", "--point", "0:200,250"]
    rc = main([*args, "--checkpoint", str(checkpoint), "--out", str(out), "--engine", engine])
    assert rc == 0


def test_segment_onnxruntime_agrees_with_torch(checkpoint, cache_env, tmp_path):
    _segment(checkpoint, tmp_path / "torch", "torch")
    _segment(checkpoint, tmp_path / "ort", "onnxruntime")
    for name in ("left_lung.png", "heart.png"):
        a = cv2.imread(str(tmp_path / "torch" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "ort" / name), cv2.IMREAD_UNCHANGED)
        assert a.shape == b.shape
        assert np.mean(a == b) >= 0.999
    ra = json.loads((tmp_path / "torch" / "result.json").read_text())
    rb = json.loads((tmp_path / "ort" / "result.json").read_text())
    for ma, mb in zip(ra["masks"], rb["masks"]):
        assert abs(ma["score"] - mb["score"]) < 1e-3
    assert any(cache_env.glob("decoder_points-*.onnx"))


def test_engine_list_and_trt_build_error(checkpoint, cache_env, capsys):
    assert main(["engine", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["cache"] == str(cache_env.resolve())
    assert {e["key"]["graph"] for e in listing["entries"]} >= {"encoder", "decoder", "decoder_points"}
    assert all(e["intact"] for e in listing["entries"])
    rc = main(["engine", "build", "--backend", "trt", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rc == 2
        assert "cannot build TensorRT engines here: the tensorrt package does not import" in err


def test_engine_bench_prints_both_side_by_side(checkpoint, cache_env, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["engine", "bench", "--checkpoint", str(checkpoint), "--runs", "2", "--prompts", "1,3"]
    assert main([*argv, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch ms" in text
    assert "onnxruntime ms" in text
    assert "frame K=3" in text
    res = json.loads(out.read_text())
    assert set(res["results"]["encode"]) == {"torch", "onnxruntime"}
    assert res["results"]["decode K=3"]["onnxruntime"]["median_ms"] > 0
    assert res["results"]["decode K=3"]["onnxruntime"]["runs"] == 2


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = ["bash", str(REPO / "engines/gpu_check.sh"), "--device", "cpu", "--models", "tiny"]
    cmd += ["--runs", "2", "--warmup", "1", "--prompts", "1,3", "--no-compile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(out.read_text())
    v = rep["models"]["tiny"]["variants"]
    assert set(v) == {"eager-fp32", "padded-fp32"}
    for r in v.values():
        assert r["parity_vs_cpu_fp32"]["ok"]
        assert set(r["decode"]) == {"1", "3"}
        assert r["encode"]["p99_ms"] >= r["encode"]["median_ms"] > 0
    assert rep["models"]["tiny"]["trt"]["status"] in ("not run", "ran")


def test_gpu_check_refuses_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    proc = subprocess.run(
        ["bash", str(REPO / "engines/gpu_check.sh"), "--models", "tiny", "--out", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 3
    assert "no CUDA device" in proc.stderr


def test_engine_bench_times_whole_frames_and_the_ort_engine_does_not_spin(checkpoint, cache_env, tmp_path):
    """The node's ORT sessions must not busy-wait (their pools starve each other on 2 cores), and
    the bench's frame cells are measured (encoder then decoder), not a sum of two medians."""
    out = tmp_path / "bench.json"
    argv = ["engine", "bench", "--checkpoint", str(checkpoint), "--runs", "2", "--prompts", "3"]
    assert main([*argv, "--engines", "onnxruntime", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["engines"]["onnxruntime"]["allow_spinning"] is False
    assert res["results"]["frame K=3"]["onnxruntime"]["runs"] == 2

    from engines.onnxruntime_engine import session_options

    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
