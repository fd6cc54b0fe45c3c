"""fit -> eval round trip on a tiny set, resume, and the eval JSON contract."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from train.fit import FitConfig, fit
from train.toyset import write_toy_fluoroseg, write_toy_folder

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_test.yaml"


def _cfg(tmp: Path, data: Path, out: str, **kw) -> FitConfig:
    cfg = FitConfig.load(CONFIG)
    cfg.data = [str(data)]
    cfg.out = str(tmp / out)
    cfg.text_cache = str(tmp / "text_features.pt")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_fluoroseg(tmp_path_factory.mktemp("toy") / "fs", n_train=4, n_val=2, size=64)


def test_fit_then_eval_round_trip(toy: Path, tmp_path: Path) -> None:
    from train.cli import main

    summary = fit(_cfg(tmp_path, toy, "run"))
    run = tmp_path / "run"
    assert summary["steps"] == 4
    for f in ("model.safetensors", "last.pt", "log.csv", "fit_config.json"):
        assert (run / f).is_file(), f
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,")
    assert len(rows) == 5
    assert (run / "tb").is_dir()

    rc = main(
        [
            "eval",
            "--checkpoint",
            str(run / "model.safetensors"),
            "--data",
            str(toy),
            "--split",
            "val",
            "--json",
            str(tmp_path / "ev" / "eval.json"),
            "--clicks",
            "1,3,8",
            "--calibrate",
            "--no-progress",
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # the JSON contract others script against
    for key in ("per_prompt", "overall", "absent_fp_rate", "cases"):
        assert key in ev
    assert set(ev["per_prompt"]) >= {"lungs", "left_lung", "right_lung", "heart"}
    lung = ev["per_prompt"]["lungs"]
    assert 0.0 <= lung["dice"] <= 1.0
    assert set(lung["dice_points"]) == {"1", "3", "8"}
    assert isinstance(ev["overall"]["dice"], float)
    assert ev["cases"]
    assert {"case", "structure", "dice", "present"} <= set(ev["cases"][0])
    n_val_present = sum(1 for r in ev["cases"] if r["present"])
    assert ev["overall"]["n"] == n_val_present
    # absent prompts exist in the toy set (the K-wire is missing from some images)
    assert ev["n_absent"] == sum(1 for r in ev["cases"] if not r["present"])
    assert ev["absent_fp_rate"] is None or 0.0 <= ev["absent_fp_rate"] <= 1.0
    assert Path(ev["montage"]).is_file()
    assert Path(ev["reliability_plot"]).is_file()
    # the calibrated threshold was written into the model and is used by eval
    from fluorosam_rt.bundle import load_bundle

    b = load_bundle(run / "model.safetensors")
    assert b.meta["presence_calibration"]["split"] == "val"
    assert ev["presence_threshold"] == pytest.approx(b.presence_threshold)


def test_eval_prompts_override_on_labelled_folder(tmp_path: Path, toy: Path) -> None:
    from train.evaluate import EvalOptions, evaluate

    fit(_cfg(tmp_path, toy, "run", max_steps=1))
    folder = write_toy_folder(tmp_path / "folder", n=2, size=72)
    override = tmp_path / "p.json"
    override.write_text(json.dumps({"lungs": "both lungs", "left_lung": "L lung", "right_lung": "R lung"}))
    ev = evaluate(
        str(tmp_path / "run" / "model.safetensors"),
        str(folder),
        None,
        str(override),
        opt=EvalOptions(clicks=(1,)),
        progress=False,
        table=False,
    )
    assert ev["per_prompt"]["lungs"]["prompt"] == "both lungs"
    assert ev["per_prompt"]["left_lung"]["n"] == 2
    assert ev["absent_fp_rate"] is None  # a labelled folder has no known-absent structures
    assert all(r["prompt"] in {"both lungs", "L lung", "R lung"} for r in ev["cases"])


def test_calibration_pools_several_roots(toy: Path, tmp_path: Path) -> None:
    """The presence gate is fitted to the scores of every root at once, not to the first alone."""
    import math

    from fluorosam_rt.bundle import load_bundle
    from fluorosam_rt.predictor import calibrate_presence_threshold
    from train.evaluate import EvalOptions, calibrate_checkpoint, make_predictor, run_cases
    from train.fluoroseg import FluoroSegDataset

    fit(_cfg(tmp_path, toy, "run", max_steps=1))
    ckpt = str(tmp_path / "run" / "model.safetensors")
    other = write_toy_fluoroseg(tmp_path / "other", n_train=1, n_val=3, size=64, seed=5)
    opt = EvalOptions(clicks=())
    predictor, _ = make_predictor(ckpt)
    predictor.presence_threshold = -math.inf
    per_root = [run_cases(predictor, FluoroSegDataset(root, "val"), opt, False) for root in (toy, other)]

    def gate(rows: list[dict]) -> float:
        pres = [r["score"] for r in rows if r["present"]]
        return calibrate_presence_threshold(pres, [r["score"] for r in rows if not r["present"]], 0.05)

    pooled = gate(per_root[0] + per_root[1])
    # List first the root whose own gate differs from the pooled one, so that a calibration that
    # read only the first root would fail here.
    roots = [str(toy), str(other)]
    if gate(per_root[0]) == pytest.approx(pooled):
        roots.reverse()
        assert gate(per_root[1]) != pytest.approx(pooled)
    t = calibrate_checkpoint(ckpt, roots, "val", opt, 0.05)
    assert t == pytest.approx(pooled)
    meta = load_bundle(ckpt).meta["presence_calibration"]
    assert meta["data"] == roots
    assert load_bundle(ckpt).presence_threshold == pytest.approx(pooled)


@pytest.mark.slow
def test_resume_continues_exactly(toy: Path, tmp_path: Path) -> None:
    straight = _cfg(tmp_path, toy, "a", max_steps=4, ckpt_every=2)
    fit(straight)
    first = _cfg(tmp_path, toy, "b", max_steps=2, ckpt_every=2)
    fit(first)
    second = _cfg(tmp_path, toy, "b", max_steps=4, ckpt_every=2)
    fit(second, resume=str(tmp_path / "b" / "last.pt"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_after_one_step_continues_exactly(toy: Path, tmp_path: Path) -> None:
    """Cheap version of test_resume_continues_exactly for the default suite: 2 steps straight
    equal 1 step, a checkpoint, and a resumed step, bit for bit (augmentation and sampling RNG
    included). The ledger shows the second segment really resumed at step 1."""
    from train.fit import read_ledger

    fit(_cfg(tmp_path, toy, "a", max_steps=2, ckpt_every=1))
    fit(_cfg(tmp_path, toy, "b", max_steps=1, ckpt_every=1))
    after_one = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    # As if killed between last.pt and the ledger write: the resume restores the row from last.pt.
    ledger = tmp_path / "b" / "ledger.csv"
    ledger.write_text(ledger.read_text().replace(",0,1,", ",0,0,"))
    fit(_cfg(tmp_path, toy, "b", max_steps=2, ckpt_every=1), resume=str(tmp_path / "b" / "last.pt"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert [(r["start_step"], r["end_step"]) for r in read_ledger(tmp_path / "b")] == [("0", "1"), ("1", "2")]
    assert any(not torch.equal(after_one[k], b[k]) for k in b)  # the resumed step trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def _background_fit(toy: Path, tmp_path: Path, ckpt_every: int, log_lines: int):
    """``fluorosam-train fit --resume auto`` as a background process, returned once ``log.csv`` has
    ``log_lines`` lines; also returns its command, environment and run folder (to run it again)."""
    import os
    import subprocess
    import sys
    import time

    import yaml

    cfg = yaml.safe_load(CONFIG.read_text())
    cfg.update(max_steps=100000, ckpt_every=ckpt_every, log_every=1, text_cache=str(tmp_path / "tf.pt"))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.cli", "fit", "--config", str(cfg_path), "--data", str(toy)]
    cmd += ["--out", str(out), "--resume", "auto", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < log_lines):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    return proc, cmd, env, out


def test_sigterm_checkpoints_and_auto_resume_continues_the_ledger(toy: Path, tmp_path: Path) -> None:
    """A background run stopped by SIGTERM keeps its steps; ``--resume auto`` continues the ledger."""
    import csv
    import signal
    import subprocess

    proc, cmd, env, out = _background_fit(toy, tmp_path, ckpt_every=1000, log_lines=4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    state = torch.load(out / "last.pt", weights_only=False)
    first_steps = int(state["step"])
    assert 3 <= first_steps < 100000  # stopped early, and the steps since the last periodic ckpt were kept
    rows = list(csv.DictReader((out / "ledger.csv").read_text().splitlines()))
    assert [r["ended_by"] for r in rows] == ["SIGTERM"]
    assert int(rows[0]["start_step"]) == 0
    assert int(rows[0]["end_step"]) == first_steps
    assert float(rows[0]["cpu_s"]) > 0

    again = subprocess.run(
        [*cmd, "--max-steps", str(first_steps + 2)], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    rows = list(csv.DictReader((out / "ledger.csv").read_text().splitlines()))
    assert len(rows) == 2
    assert rows[1]["ended_by"] == "max_steps"
    assert int(rows[1]["start_step"]) == first_steps
    assert int(rows[1]["end_step"]) == first_steps + 2
    assert int(torch.load(out / "last.pt", weights_only=False)["step"]) == first_steps + 2


def test_data_globs_expand_to_the_chunks_that_exist(tmp_path: Path) -> None:
    from train.fit import expand_data_paths

    for name in ("chunk_002", "chunk_000", "other"):
        (tmp_path / name).mkdir()
    got = expand_data_paths([str(tmp_path / "chunk_*"), str(tmp_path / "other")])
    assert got == [str(tmp_path / "chunk_000"), str(tmp_path / "chunk_002"), str(tmp_path / "other")]
    assert expand_data_paths([str(tmp_path / "missing_*")]) == []


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """(parsed header, data bytes): safetensors writes its metadata map in hash order (a Rust
    HashMap), so two writes of one model can differ in the header's key order, never in content."""
    import struct

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_export_from_last_pt_equals_what_fit_writes(toy: Path, tmp_path: Path) -> None:
    """``fluorosam-train export`` makes the run's model.safetensors from last.pt (same tensors,
    bit for bit, and same metadata), and leaves the run folder as it was (it can run beside the
    training job)."""
    from train.cli import main

    fit(_cfg(tmp_path, toy, "run", max_steps=2, ckpt_every=1))
    run = tmp_path / "run"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors")]) == 0
    exported, written = (
        _safetensors_parts(tmp_path / "x.safetensors"),
        _safetensors_parts(run / "model.safetensors"),
    )
    assert exported == written  # header (tensor names, offsets, metadata) and every tensor byte
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")} == before
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["export", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y.safetensors")])
    with pytest.raises(SystemExit, match="in the run folder"):
        main(["export", "--run", str(run), "--out", str(run / "model.safetensors")])
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")} == before


def test_sigkill_leaves_a_ledger_row_up_to_the_last_checkpoint(toy: Path, tmp_path: Path) -> None:
    """A run killed without a signal handler running (SIGKILL, a machine taken back) still has its
    segment in the ledger: fit records the row at every checkpoint, and it ends where last.pt does,
    which is where ``--resume auto`` continues."""
    import signal
    import subprocess

    from train.fit import ledger_totals, read_ledger

    proc, cmd, env, out = _background_fit(toy, tmp_path, ckpt_every=2, log_lines=6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    step = int(torch.load(out / "last.pt", weights_only=False)["step"])
    assert step >= 2
    rows = read_ledger(out)
    assert len(rows) == 1
    assert rows[0]["ended_by"] == "checkpoint"
    assert int(rows[0]["start_step"]) == 0
    # Killed between last.pt and the ledger write, the row is one checkpoint behind; the resume fixes it.
    assert int(rows[0]["end_step"]) in (step, step - 2)
    assert float(rows[0]["cpu_s"]) > 0

    again = subprocess.run(
        [*cmd, "--max-steps", str(step + 1)], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-2000:]
    rows = read_ledger(out)
    assert [(r["start_step"], r["end_step"], r["ended_by"]) for r in rows] == [
        ("0", str(step), "checkpoint"),
        (str(step), str(step + 1), "max_steps"),
    ]
    assert ledger_totals(rows)["steps"] == step + 1


def test_ledger_rows_are_replaced_per_segment_and_totals_count_unknown_cpu(tmp_path: Path) -> None:
    from train.fit import ledger_totals, read_ledger, record_segment

    seg = {"start_utc": "2026-01-01T00:00:00Z", "start_step": 0, "wall_s": 10, "cpu_s": 5}
    record_segment(tmp_path, {**seg, "end_step": 100, "ended_by": "checkpoint"})
    record_segment(tmp_path, {**seg, "end_step": 200, "ended_by": "checkpoint", "wall_s": 20})
    record_segment(
        tmp_path,
        {
            **seg,
            "start_utc": "2026-01-02T00:00:00Z",
            "start_step": 200,
            "end_step": 250,
            "wall_s": 3600,
            "cpu_s": "",
        },
    )
    rows = read_ledger(tmp_path)
    assert [(r["start_step"], r["end_step"]) for r in rows] == [("0", "200"), ("200", "250")]
    t = ledger_totals(rows)
    assert t["steps"] == 250
    assert t["segments_without_cpu"] == 1
    assert t["wall_h"] == pytest.approx(3620 / 3600, abs=1e-3)
    assert t["cpu_h"] == pytest.approx(5 / 3600, abs=1e-3)


def test_a_config_stage_names_its_base_and_only_what_changes(tmp_path: Path) -> None:
    from train.fit import FitConfig

    (tmp_path / "a.yaml").write_text("lr: 1.0e-3\nsampling:\n  p_absent: 0.3\n  prompts_per_image: 5\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nsampling:\n  prompts_per_image: 9\n")
    cfg = FitConfig.load(tmp_path / "b.yaml")
    assert cfg.lr == 1.0e-3  # from the base
    assert cfg.sampling.p_absent == 0.3  # the section is merged, not replaced
    assert cfg.sampling.prompts_per_image == 9
    assert cfg.source == f"{tmp_path / 'a.yaml'} + {tmp_path / 'b.yaml'}"
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        FitConfig.load(tmp_path / "c.yaml")
    # The shipped stage 2 is stage 1 with only the tool weight changed.
    s1 = FitConfig.load(CONFIG.parents[0] / "v2_stage1.yaml")
    s2 = FitConfig.load(CONFIG.parents[0] / "v2_stage2.yaml")
    assert replace(s2, sampling=s1.sampling, source="") == replace(s1, source="")
    assert dict(s2.sampling.kind_weights)["tool"] > dict(s1.sampling.kind_weights)["tool"]


@pytest.mark.parametrize("path", sorted(CONFIG.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path: Path) -> None:
    """A stage or ablation config with a broken base: chain or an unknown key fails here, not hours
    into a background run. (v2_gpu.yaml is an override layer, merged by train.device_run.)"""
    from train.fit import FitConfig

    if path.name == "v2_gpu.yaml":
        from train import device_run

        device_run.merged_config(CONFIG.parent / "v2_stage2.yaml", [path], [])
        return
    cfg = FitConfig.load(path)
    assert cfg.source.endswith(str(path))
