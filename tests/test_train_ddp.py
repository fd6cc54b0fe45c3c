"""torchrun with 2 CPU processes (gloo) gives the same model as 1 process at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.toyset import write_toy_fluoroseg

REPO = Path(__file__).resolve().parents[1]


def _run(
    nproc: int, data: Path, out: Path, cache: Path, config: Path = REPO / "configs/train/ddp_test.yaml"
) -> dict[str, torch.Tensor]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "train.cli",
        "fit",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
        "--text-cache",
        str(cache),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out / "last.pt", weights_only=False)["model"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    data = write_toy_fluoroseg(tmp_path / "fs", n_train=8, n_val=0, size=64)
    cache = tmp_path / "text.pt"
    one = _run(1, data, tmp_path / "one", cache)
    two = _run(2, data, tmp_path / "two", cache)
    from train.fit import FitConfig, build_training_model, seed_everything

    cfg = FitConfig.load(REPO / "configs/train/ddp_test.yaml")
    seed_everything(cfg.seed)
    init, _ = build_training_model(cfg)
    moved = max(
        float((one[k].float() - v.float()).abs().max()) for k, v in init.state_dict().items() if k in one
    )
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    assert _worlds(tmp_path / "one") == [1]
    assert _worlds(tmp_path / "two") == [2]  # torchrun really ran two processes
    assert moved > 1e-4  # training changed the weights...
    assert worst < moved / 50  # ...and two processes changed them the same way
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=2e-5, msg=k)


def _worlds(out: Path) -> list[int]:
    """World size of each training segment, from the run's ledger (train/fit.py)."""
    from train.fit import read_ledger

    return [int(r["world"]) for r in read_ledger(out)]


def test_two_processes_equal_one_after_one_step(tmp_path: Path) -> None:
    """Cheap version of the slow test for the default suite: one step at global batch 4, one
    torchrun launch with 2 processes against the same step run in this process."""
    import yaml

    from train.fit import FitConfig, build_training_model, fit, seed_everything

    data = write_toy_fluoroseg(tmp_path / "fs", n_train=4, n_val=0, size=64)
    cfg_path = tmp_path / "ddp1.yaml"
    cfg_path.write_text(
        yaml.safe_dump({**yaml.safe_load((REPO / "configs/train/ddp_test.yaml").read_text()), "max_steps": 1})
    )
    cache = tmp_path / "text.pt"
    cfg = FitConfig.load(cfg_path)
    cfg.data, cfg.out, cfg.text_cache = [str(data)], str(tmp_path / "one"), str(cache)
    fit(cfg)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    two = _run(2, data, tmp_path / "two", cache, config=cfg_path)
    assert _worlds(tmp_path / "one") == [1]
    assert _worlds(tmp_path / "two") == [2]  # torchrun really ran two processes
    seed_everything(cfg.seed)
    init, _ = build_training_model(cfg)
    moved = max(
        float((one[k].float() - v.float()).abs().max()) for k, v in init.state_dict().items() if k in one
    )
    worst = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    print(f"one step: weights moved up to {moved:.2e}, 1 vs 2 processes differ by up to {worst:.2e}")
    assert moved > 1e-5  # the step changed the weights...
    assert worst < moved / 50  # ...and two processes changed them the same way
