"""The multi-body synth run on tiny phantom bodies: body choice, regions, lazy bodies, shards, atomic output,
bad input. Bodies live in a temporary bodies root (FLUOROSAM_BODIES) and are registered for the test only."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_synth_mesh import box_triangles
from train.cli import main
from train.synth.mesh import write_stl

STRUCTURES = {
    "tiny_chest": {"lung_upper_lobe_left": 10, "lung_upper_lobe_right": 12, "vertebrae_T6": 38},
    "tiny_pelvis": {"hip_left": 77, "hip_right": 78, "sacrum": 25},
    "tiny_heldout": {"hip_left": 77, "hip_right": 78, "sacrum": 25},
}
HELDOUT = {"tiny_heldout"}
AFF = np.diag([-3.0, 3.0, 3.0, 1.0])
AFF[:3, 3] = [60.0, -60.0, -48.0]


def _volume(kind: str) -> tuple[np.ndarray, np.ndarray]:
    shape = (40, 40, 32)
    hu = np.full(shape, -1000.0, np.float32)
    lab = np.zeros(shape, np.uint8)
    hu[4:36, 4:36, 2:30] = 20.0
    if kind == "tiny_chest":
        lab[6:18, 6:34, 4:28] = 12
        lab[22:34, 6:34, 4:28] = 10
        hu[17:23, 26:32, 2:30], lab[17:23, 26:32, 2:30] = 700.0, 38
    else:
        for sl, v in (
            ((slice(6, 16), slice(10, 28), slice(8, 24)), 78),
            ((slice(24, 34), slice(10, 28), slice(8, 24)), 77),
        ):
            hu[sl], lab[sl] = 700.0, v
        hu[17:23, 24:32, 10:22], lab[17:23, 24:32, 10:22] = 600.0, 25
    return hu, lab


def write_body(root: Path, name: str) -> Path:
    """A built body folder as ``bodies build`` writes it: ct, labels, structures.csv, body.json."""
    from train.synth.regions import regions_of

    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    hu, lab = _volume(name)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), AFF), str(d / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(lab, AFF), str(d / "labels.nii.gz"))
    rows = "".join(f"{v},{k}\n" for k, v in STRUCTURES[name].items())
    (d / "structures.csv").write_text("id,structure\n" + rows)
    info = {"name": name, "structures": list(STRUCTURES[name]), "regions": regions_of(set(STRUCTURES[name]))}
    (d / "body.json").write_text(json.dumps(info))
    return d


@pytest.fixture
def bodies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three tiny built bodies (one held out) in a temporary bodies root, registered for this test."""
    from train.synth import bodies as reg

    root = tmp_path / "bodies"
    monkeypatch.setenv("FLUOROSAM_BODIES", str(root))
    reg._load_builders()  # the real registrations first, so ours are additions
    for name in STRUCTURES:
        spec = reg.BodySpec(
            name=name,
            description="test phantom",
            source="tests",
            licence="n/a",
            use="tests",
            sources=(),
            build=lambda _s, _o: None,
            heldout=name in HELDOUT,
        )
        monkeypatch.setitem(reg._REGISTRY, name, spec)
        write_body(root, name)
    return root


def _args(out: Path, *extra: str, n: int = 6, ipc: int = 1, size: int = 32) -> list[str]:
    return [
        "synth",
        "--n",
        str(n),
        "--size",
        str(size),
        "--images-per-case",
        str(ipc),
        "--out",
        str(out),
        "--no-progress",
        "--contact-sheet",
        "0",
        *extra,
    ]


def _cases(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("case_*/case.json"))]


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the case folders plus the splits and categories, by relative path."""
    out = {}
    for p in [*sorted(root.glob("case_*/*")), root / "train.txt", root / "val.txt", root / "categories.json"]:
        out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_bodies_all_excludes_heldout_and_records_body_region_view(bodies: Path, tmp_path: Path) -> None:
    out = tmp_path / "all"
    assert main(_args(out, "--bodies", "all", "--seed", "3")) == 0
    cases = _cases(out)
    used = {c["body"] for c in cases}
    assert used <= {"tiny_chest", "tiny_pelvis"}
    assert len(used) == 2  # 6 cases, equal weights: both drawn with this seed
    for c in cases:
        assert not c["heldout_body"]
        assert len(c["variation"]["scale"]) == 3  # each case one patient: its variation recorded
        for img in c["images"]:
            region = img["region"]
            assert region in (
                {"chest", "thoracic_spine"}
                if c["body"] == "tiny_chest"
                else {"pelvis", "hip_left", "hip_right"}
            )
            assert img["view"] == img["camera"]["view"]
    doc = json.loads((out / "dataset.json").read_text())
    assert {b["name"] for b in doc["bodies"]} == {"tiny_chest", "tiny_pelvis"}
    assert sum(doc["cases_per_body"].values()) == 6
    assert sum(doc["images_per_region"].values()) == 6
    # Prepared once into the shared cache, not into the set.
    assert len(list((bodies / ".prepared").glob("tiny_*.npz"))) == 2
    assert not (out / ".cache").exists()
    held = tmp_path / "held"
    assert main(_args(held, "--bodies", "heldout", "--variation", "0", n=2)) == 0
    assert all(c["variation"] is None for c in _cases(held))
    assert {c["body"] for c in _cases(held)} == {"tiny_heldout"}
    assert all(c["heldout_body"] for c in _cases(held))


def test_regions_restrict_views_and_skip_bodies(bodies: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "pelvis"
    args = _args(
        out, "--body", "tiny_chest", "--body", "tiny_pelvis", "--regions", "pelvis", "--variation", "0", n=4
    )
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipping body 'tiny_chest'" in err
    cases = _cases(out)
    assert {c["body"] for c in cases} == {"tiny_pelvis"}
    assert {img["region"] for c in cases for img in c["images"]} == {"pelvis"}
    # No body has the region: one line, exit 2, nothing written.
    bad = tmp_path / "skull"
    assert main(_args(bad, "--bodies", "all", "--regions", "skull")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no body has any of the regions skull" in err
    assert not bad.exists()
    assert not _leftovers(tmp_path)
    assert main(_args(bad, "--bodies", "all", "--regions", "elbow")) == 2
    assert "unknown region 'elbow'" in capsys.readouterr().err


def test_body_weights_share_cases() -> None:
    from train.synth.body_choice import BodyRef, pick_bodies

    refs = [BodyRef("a", "a", weight=3.0), BodyRef("b", "b", weight=1.0)]
    picks = pick_bodies(5, list(range(4000)), refs)
    share = np.mean([picks[c] == 0 for c in range(4000)])
    assert abs(share - 0.75) < 0.03
    # Each case's draw is its own: the same for any subset of cases (shards), any order.
    sub = pick_bodies(5, [3999, 17, 2], refs)
    assert sub == {c: picks[c] for c in (3999, 17, 2)}
    assert main(["synth", "--n", "1", "--out", "/nonexistent/x", "--body-weights", "a=-1"]) == 2


def test_shards_merge_to_the_unsharded_set(bodies: Path, tmp_path: Path) -> None:
    """2 shards merged == 1 run: byte-identical images, annotations, case files and splits."""
    base = ["--bodies", "all", "--seed", "11", "--val-fraction", "0.5"]
    one = tmp_path / "one"
    assert main(_args(one, *base, n=7, ipc=2)) == 0
    for i in range(2):
        assert main(_args(tmp_path / "sh", *base, "--shard", f"{i}/2", n=7, ipc=2)) == 0
    shards = sorted((tmp_path / "sh").glob("shard-*"))
    assert [p.name for p in shards] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    assert (shards[1] / "train.txt").read_text() == "case_00001\n"  # case 3 is val
    merged = tmp_path / "merged"
    assert main(["synth-merge", str(merged), *map(str, shards), "--contact-sheet", "1"]) == 0
    a, b = _files(one), _files(merged)
    assert sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert (one / "val.txt").read_text() == "case_00002\ncase_00003\n"  # the last half
    assert list(merged.glob("contact_sheet_*.png"))
    # A missing or repeated shard is refused, and nothing is left behind.
    assert main(["synth-merge", str(tmp_path / "m2"), str(shards[0])]) == 2
    assert main(["synth-merge", str(tmp_path / "m3"), str(shards[0]), str(shards[0])]) == 2
    assert not (tmp_path / "m2").exists()
    assert not (tmp_path / "m3").exists()
    assert not _leftovers(tmp_path)


def test_shard_auto_from_launcher_variables() -> None:
    from train.synth.shards import parse_shard

    assert parse_shard("3/8", {}) == (3, 8)
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "5"}) == (4, 5)
    slurm1 = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}
    assert parse_shard("auto", slurm1) == (4, 5)  # --array=1-5
    assert parse_shard("auto", {"RANK": "0", "WORLD_SIZE": "2"}) == (0, 2)
    assert parse_shard(None, {}) is None
    for bad in ("2/2", "x/3", "3", "-1/4"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad, {})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        parse_shard("auto", {})


def test_error_mid_run_leaves_nothing_and_keeps_an_earlier_set(
    bodies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import train.synth.generate as gen

    out = tmp_path / "set"
    assert main(_args(out, "--body", "tiny_pelvis", "--variation", "0", n=2)) == 0
    before = _files(out)
    real = gen.Worker.render_case
    calls = []

    def failing(self, case, n_images, body_index):
        calls.append(case)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(self, case, n_images, body_index)

    monkeypatch.setattr(gen.Worker, "render_case", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gen.generate(
            gen.SynthConfig(
                bodies=["tiny_pelvis"], n=4, size=32, images_per_case=1, variation=0, out=str(out)
            ),
            False,
            0,
        )
    assert calls == [0, 1]
    assert _files(out) == before  # the earlier set, untouched
    calls.clear()
    with pytest.raises(RuntimeError):
        gen.generate(
            gen.SynthConfig(
                bodies=["tiny_pelvis"],
                n=4,
                size=32,
                images_per_case=1,
                variation=0,
                out=str(tmp_path / "new"),
            ),
            False,
            0,
        )
    assert not (tmp_path / "new").exists()
    assert not _leftovers(tmp_path)


def test_lazy_bodies_ordered_by_body_and_cached_on_disk(bodies: Path, tmp_path: Path, monkeypatch) -> None:
    """One body held at a time still loads each body once (jobs run grouped by body); a second run prepares
    nothing (the prepared volumes come from the on-disk cache)."""
    import train.synth.body_pool as pool
    from train.synth.generate import SynthConfig, generate

    cfg = SynthConfig(
        bodies=["tiny_chest", "tiny_pelvis"], n=6, size=32, images_per_case=1, seed=2, variation=0
    )
    cfg.out, cfg.max_bodies_per_worker = str(tmp_path / "a"), 1
    doc = generate(cfg, progress=False, contact_sheet=0)
    assert set(doc["cases_per_body"]) == {"tiny_chest", "tiny_pelvis"}
    assert doc["body_loads"] == 2
    assert 0 < doc["worker_peak_rss_mb"] < 4096

    def no_prepare(*_a, **_k):
        raise AssertionError("prepared again")

    monkeypatch.setattr(pool, "prepare_volume", no_prepare)
    cfg.out = str(tmp_path / "b")
    generate(cfg, progress=False, contact_sheet=0)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    lru = pool.BodyPool(max_bodies=2)
    for name in ["x", "y", "x", "z", "x", "y"]:
        lru.get(name, lambda n=name: n)
    assert lru.loads == 4  # x, y, z, then y again (evicted by z; x was used more recently)


def test_val_fraction_one_finishes_with_contact_sheets(bodies: Path, tmp_path: Path) -> None:
    out = tmp_path / "v"
    args = _args(out, "--body", "tiny_chest", "--val-fraction", "1.0", "--variation", "0", n=2)
    args[args.index("--contact-sheet") + 1] = "2"
    assert main(args) == 0
    assert (out / "train.txt").read_text() == ""
    assert (out / "val.txt").read_text() == "case_00000\ncase_00001\n"
    regions = {img["region"] for c in _cases(out) for img in c["images"]}
    assert {p.name for p in out.glob("contact_sheet_*.png")} == {f"contact_sheet_{r}.png" for r in regions}


def _one_line_error(capsys, must: list[str]) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    for m in must:
        assert m in err, err


def test_bad_input_one_line_errors_and_nothing_written(bodies: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    # A CT without labels.
    lone = tmp_path / "lone"
    lone.mkdir()
    hu, lab = _volume("tiny_pelvis")
    nib.save(nib.Nifti1Image(hu, AFF), str(lone / "scan.nii.gz"))
    assert main(_args(out, "--body", str(lone / "scan.nii.gz"))) == 2
    _one_line_error(capsys, ["no label map", "scan.nii.gz"])
    # Labels not on the CT's grid: another shape, then another affine.
    nib.save(nib.Nifti1Image(lab[:-2], AFF), str(lone / "scan_labels.nii.gz"))
    assert main(_args(out, "--body", str(lone / "scan.nii.gz"))) == 2
    _one_line_error(capsys, ["scan_labels.nii.gz", "shape"])
    shifted = AFF.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(lab, shifted), str(lone / "scan_labels.nii.gz"))
    assert main(_args(out, "--body", str(lone / "scan.nii.gz"))) == 2
    _one_line_error(capsys, ["scan_labels.nii.gz", "not on the grid"])
    # An unknown structure in a body's structures.csv, and in --structures.
    odd = tmp_path / "odd"
    write_body(tmp_path, "tiny_pelvis").rename(odd)
    (odd / "structures.csv").write_text("id,structure\n77,hip_left\n78,hip_rihgt\n25,sacrum\n")
    assert main(_args(out, "--body", str(odd))) == 2
    _one_line_error(capsys, ["structures.csv", "hip_rihgt"])
    assert main(_args(out, "--body", "tiny_pelvis", "--structures", "sacrum,hart")) == 2
    _one_line_error(capsys, ["hart"])
    # A mesh that is not watertight.
    write_stl(tmp_path / "open.stl", box_triangles([0, 0, 0], [10, 10, 10])[:-1])
    assert main(_args(out, "--body", "tiny_pelvis", "--tool-stl", str(tmp_path / "open.stl"))) == 2
    _one_line_error(capsys, ["open.stl", "not watertight", "open edges"])
    # A body without the requested region; an unknown body; a registered body that is not built.
    assert main(_args(out, "--body", "tiny_pelvis", "--regions", "knee_left")) == 2
    _one_line_error(capsys, ["knee_left", "tiny_pelvis"])
    assert main(_args(out, "--body", "tiny_pelvs")) == 2
    _one_line_error(capsys, ["tiny_pelvs", "not found", "registered body"])
    os.remove(bodies / "tiny_chest" / "body.json")
    assert main(_args(out, "--body", "tiny_chest")) == 2
    _one_line_error(capsys, ["tiny_chest", "bodies build tiny_chest"])
    # An output folder that is not a data set is never overwritten.
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    assert main(_args(tmp_path / "precious", "--body", "tiny_pelvis")) == 2
    _one_line_error(capsys, ["precious", "not empty"])
    assert not out.exists()
    assert not _leftovers(tmp_path)


def test_watertight_check() -> None:
    from train.synth.mesh import watertight_problem

    box = box_triangles([0, 0, 0], [1, 2, 3])
    assert watertight_problem(box) is None
    two = np.concatenate([box, box_triangles([1, 0, 0], [2, 2, 3])])  # touching closed shells are fine
    assert watertight_problem(two) is None
    assert watertight_problem(box[:-1]) == "3 open edges"
    flipped = box.copy()
    flipped[0] = flipped[0][[0, 2, 1]]
    assert watertight_problem(flipped) == "triangles wound inconsistently"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for k, v in sorted(_files(root).items()):
        h.update(k.encode())
        h.update(v)
    return h.hexdigest()


@pytest.mark.slow
def test_worker_count_does_not_change_the_set(bodies: Path, tmp_path: Path) -> None:
    """1 and 2 worker processes write the same annotations and case files (images up to float rounding)."""
    base = ["--bodies", "all", "--seed", "5"]
    assert main(_args(tmp_path / "w1", *base, n=6, ipc=2)) == 0
    assert main(_args(tmp_path / "w2", *base, "--workers", "2", n=6, ipc=2)) == 0
    a, b = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert sorted(a) == sorted(b)
    for k in a:
        if k.endswith(".tiff"):
            import tifffile

            assert np.allclose(
                tifffile.imread(tmp_path / "w1" / k), tifffile.imread(tmp_path / "w2" / k), atol=1e-5
            )
        else:
            assert a[k] == b[k], k


def test_synth_bench_generator_reports_speed_and_memory(bodies: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["synth-bench", "--generator", "--body", "tiny_pelvis", "--n", "2", "--images-per-case", "1"]
    assert main([*args, "--workers", "1", "--size", "32", "--variation", "0", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["generator"]
    assert row["n_images"] == 2
    assert row["images_per_second"] > 0
    assert 0 < row["worker_peak_rss_mb"] < 4096
    assert row["bodies"] == {"tiny_pelvis": ["pelvis", "hip_left", "hip_right"]}


def test_prepare_only_fills_the_shared_cache(bodies: Path, tmp_path: Path, capsys) -> None:
    assert main(["synth", "--bodies", "all", "--prepare-only"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["tiny_chest", "tiny_pelvis"]
    assert sorted(p.name.split("-")[0] for p in (bodies / ".prepared").glob("*.npz")) == [
        "tiny_chest",
        "tiny_pelvis",
    ]
    assert main(["synth", "--bodies", "all", "--n", "2"]) == 2  # a real run still wants --out


def test_prepared_cache_drops_least_recently_used_files_beyond_its_cap(tmp_path: Path) -> None:
    """Old prepared volumes (rebuilt bodies, other spacings) do not pile up: the least recently used go
    first, the file just written never, and a load counts as a use."""
    import os

    from train.synth.body_pool import prune_prepared

    files = []
    for k, name in enumerate(["a-1.npz", "b-1.npz", "a-2.npz", "c-1.npz"]):
        f = tmp_path / name
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + k, 1000 + k))
        files.append(f)
    os.utime(files[0], (2000, 2000))  # a-1 was loaded recently: now the newest but one
    removed = prune_prepared(tmp_path, keep=files[3], max_bytes=2500)
    assert [f.name for f in removed] == ["b-1.npz", "a-2.npz"]
    assert sorted(f.name for f in tmp_path.glob("*.npz")) == ["a-1.npz", "c-1.npz"]
    assert prune_prepared(tmp_path, keep=files[3], max_bytes=0) == [files[0]]  # never the kept file
