"""The GPU segment's tooling (scripts/gpu_pack.sh, scripts/gpu_train.sh, train/device_*.py), cheaply.

The size accounting must equal what the device tool sends, the checkpoint must come back byte-exact
from its parts, packed bodies must hold the same voxels, the tabulated physics must answer exactly as
spekpy/xraydb do, and the device script's dry run must validate its inputs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import device_pack, device_run

ROOT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_tree_budget_counts_tracked_untracked_and_carry_exactly(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("ignored/\ncarry/\n")
    (repo / "a.txt").write_bytes(b"x" * 1000)
    _git(repo, "add", ".gitignore", "a.txt")
    (repo / "new.py").write_bytes(b"y" * 300)  # untracked, not ignored: travels
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"z" * 5000)  # ignored and not carried: stays
    (repo / "carry" / "sub").mkdir(parents=True)
    (repo / "carry" / "w.whl").write_bytes(b"w" * 700)
    (repo / "carry" / "sub" / "b.npz").write_bytes(b"b" * 50)
    b = device_pack.tree_budget(repo, ["carry"])
    assert b["tracked"] == 1000 + len("ignored/\ncarry/\n")
    assert b["untracked_not_ignored"] == 300
    assert b["carry"] == {"carry": 750}
    assert b["total"] == b["tracked"] + 300 + 750
    assert b["left"] == 64 * 1024 * 1024 - b["total"]
    lines = device_pack.budget_lines(b, device_pack.carry_detail(repo / "carry"))
    assert any(line.startswith("total") and line.rstrip().endswith(f"{b['total']} B") for line in lines)


def _checkpoint(path: Path) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 64)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 7, "elapsed_s": 1.5}
    torch.save(state, path)
    return state


def test_checkpoint_split_merge_is_byte_exact(tmp_path: Path) -> None:
    src = tmp_path / "last.pt"
    state = _checkpoint(src)
    manifest = device_run.split_file(src, tmp_path / "out", part_bytes=10_000)
    m = json.loads(manifest.read_text())
    assert len(m["parts"]) == -(-src.stat().st_size // 10_000) > 2
    assert all((tmp_path / "out" / p).stat().st_size <= 10_000 for p in m["parts"])
    dest = tmp_path / "merged.pt"
    assert device_run.merge_parts(manifest, dest) == device_run.sha256_file(src)
    assert dest.read_bytes() == src.read_bytes()
    back = torch.load(dest, weights_only=False)
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert back["optimizer"]["state"][0]["exp_avg_sq"].equal(state["optimizer"]["state"][0]["exp_avg_sq"])
    # a damaged part is refused, not merged
    p0 = tmp_path / "out" / m["parts"][1]
    data = bytearray(p0.read_bytes())
    data[5] ^= 1
    p0.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match"):
        device_run.merge_parts(manifest, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_default_part_size_fits_what_comes_back() -> None:
    assert device_run.PART_BYTES <= device_pack.FILE_BACK_LIMIT


def test_packed_bodies_unpack_to_the_same_voxels(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "bodies"
    rng = np.random.default_rng(0)
    hu = {}
    for name in ("b1", "b2"):
        d = root / name
        d.mkdir(parents=True)
        hu[name] = rng.integers(-1024, 2000, (12, 10, 8)).astype(np.int16)
        nib.save(nib.Nifti1Image(hu[name], np.diag([1.5, 1.5, 2.0, 1.0])), str(d / "ct.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.uint8), np.eye(4)), str(d / "labels.nii.gz"))
        (d / "body.json").write_text("{}")
        (d / "structures.csv").write_text("id,structure\n")
    archive = tmp_path / "bodies.tar.xz"
    manifest = device_pack.pack_bodies(root, ["b1", "b2"], archive, preset=1)
    assert sorted(manifest) == ["b1", "b2"]
    names = device_pack.unpack_bodies(archive, tmp_path / "dest", workers=1)
    assert names == ["b1", "b2"]
    for name in names:
        d = tmp_path / "dest" / name
        assert np.array_equal(np.asarray(nib.load(str(d / "ct.nii.gz")).dataobj), hu[name])
        assert not (d / "ct.nii").exists()
        assert (d / "labels.nii.gz").read_bytes() == (root / name / "labels.nii.gz").read_bytes()


def test_merged_config_layers_and_rejects_unknown_keys(tmp_path: Path) -> None:
    cfg = device_run.merged_config(
        ROOT / "configs/train/v2_stage2.yaml",
        [ROOT / "configs/train/v2_gpu.yaml"],
        ["threads=2", "sampling.p_absent=0.2"],
    )
    assert "base" not in cfg  # the stage's base: chain is resolved, as fit --config resolves it
    assert dict(cfg["sampling"]["kind_weights"])["tool"] == 8.0  # stage 2's, kept under the overrides
    assert cfg["global_batch"] == 32
    assert cfg["threads"] == 2
    assert cfg["encoder_init"] == ""
    assert cfg["sampling"]["p_absent"] == 0.2
    assert cfg["sampling"]["prompts_per_image"] == 8
    assert cfg["lr"] == 4.0e-4  # untouched keys stay the CPU run's (optimiser groups must match)
    with pytest.raises(ValueError, match="unknown training config keys"):
        device_run.merged_config(ROOT / "configs/train/v2_stage1.yaml", [], ["global_batchh=8"])


def test_bank_text_encoder_serves_identity_and_refuses_new_texts(tmp_path: Path) -> None:
    f = tmp_path / "bank.pt"
    torch.save({"texts": ["lung"], "features": torch.zeros(1, 384), "identity": "abc"}, f)
    enc = device_run.BankTextEncoder(f, "minilm")
    assert enc.identity() == "abc"
    assert enc.kind == "minilm"
    assert enc.feature_dim == 384
    with pytest.raises(KeyError, match="not in the text-feature bank"):
        enc.encode(["a new phrasing"])


def test_step_timing_from_log(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("step,elapsed_s\n1010,100.0\n1020,105.0\n1030,106.0\n1040,108.0\n")
    t = device_run.step_timing(log)
    assert t["windows"] == 3
    assert t["first_window_s_per_step"] == 0.5
    assert t["median_s_per_step"] == 0.2


def test_tabulated_physics_answers_exactly(tmp_path: Path) -> None:
    pytest.importorskip("spekpy")
    pytest.importorskip("xraydb")
    from train import physics_tables

    table = tmp_path / "physics.npz"
    physics_tables.write_tables(table, kvps=(70,), cu_mm=(0.0, 0.2))
    physics_tables.write_shims(tmp_path / "shim")
    code = (
        "import json,sys;from train.synth.physics import binned_spectrum;"
        "from train.synth.materials import attenuation_table;"
        "e,w=binned_spectrum(70,cu_mm=0.2);print(json.dumps([e.tolist(),w.tolist(),"
        "attenuation_table(e).tolist()]))"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}"}
    real = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env_tab = {
        **env,
        "PYTHONPATH": f"{tmp_path / 'shim'}:{ROOT}",
        physics_tables.TABLE_ENV: str(table),
    }
    tab = subprocess.run(
        [sys.executable, "-c", code], env=env_tab, capture_output=True, text=True, check=True
    )
    assert json.loads(tab.stdout) == json.loads(real.stdout)
    missing = subprocess.run(
        [sys.executable, "-c", "from train.synth.physics import binned_spectrum;binned_spectrum(80)"],
        env=env_tab,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0
    assert "not in the physics table" in missing.stderr


def _fake_carry(carry: Path, step: int = 930) -> None:
    (carry / "shim" / "spekpy").mkdir(parents=True)
    (carry / "shim" / "xraydb").mkdir(parents=True)
    for f in ("last.pt.xz", "text_features.pt", "bodies.tar.xz", "physics.npz"):
        (carry / f).write_bytes(b"")
    for f in ("shim/spekpy/__init__.py", "shim/xraydb/__init__.py"):
        (carry / f).write_text("")
    (carry / "pack.json").write_text(json.dumps({"step": step, "checkpoint_sha256": "0" * 64}))


def _dry(carry: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "CARRY": str(carry), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_train.sh"), *args], env=e, capture_output=True, text=True, timeout=60
    )


def test_gpu_train_dry_run_prints_plan_and_checks_inputs(tmp_path: Path) -> None:
    carry = tmp_path / "carry"
    _fake_carry(carry)
    r = _dry(carry, "--dry-run", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "device cpu; resume step 930" in r.stdout
    assert "inputs and config are valid" in r.stdout
    r = _dry(carry, "--dry-run", SET="no_such_key=1")
    assert r.returncode != 0
    assert "unknown training config keys" in r.stderr
    r = _dry(carry, "--dry-run", "--device", "tpu")
    assert r.returncode == 2
    assert "--device must be cuda or cpu" in r.stderr
    r = _dry(carry, "--dry-run", WORK=str(ROOT / "runs" / "v2"))
    assert r.returncode == 1
    assert "WORK must not be under runs/" in r.stderr
    (carry / "bodies.tar.xz").unlink()
    r = _dry(carry, "--dry-run")
    assert r.returncode == 1
    assert "missing in .gpu_carry: bodies.tar.xz" in r.stderr
