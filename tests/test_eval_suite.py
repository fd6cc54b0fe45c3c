"""The issue-16 evaluation: paraphrase drop on known answers, absent prompts, tool groups, the target
table, the calibration rule, and the whole suite on toy sets with a small random model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from train.evaluate import (
    EvalOptions,
    _sample_absent,
    calibrate_checkpoint,
    calibration_bodies,
    run_cases,
    summarize,
)
from train.fluoroseg import FluoroSegDataset
from train.paraphrase_eval import heldout_phrasings, summarize_paraphrase
from train.toyset import write_toy_fluoroseg, write_toy_folder


@dataclass
class _Result:
    mask: np.ndarray
    score: float
    present: bool
    logits: np.ndarray | None = None


class FakePredictor:
    """Answers from the truth: a text maps to its structure, and ``answer(case, structure, text)``
    says whether to return the true mask (else an empty one, reported absent)."""

    def __init__(self, ds, answer) -> None:
        self.ds = ds
        self.answer = answer
        self.cases = [ds.load(i) for i in range(len(ds))]
        self.text_to_name: dict[str, str] = {}
        for name, info in ds.structures.items():
            self.text_to_name[info.prompt] = name
            for t in heldout_phrasings(name, info.prompt):
                self.text_to_name[t] = name
        self.case = None

    def set_image(self, pix: np.ndarray) -> None:
        self.case = next(c for c in self.cases if c.image.shape == pix.shape and np.array_equal(c.image, pix))

    def predict(self, prompts, return_logits: bool = False) -> list[_Result]:
        out = []
        for p in prompts:
            text = p if isinstance(p, str) else p.text
            name = self.text_to_name.get(text)
            truth = self.case.masks.get(name) if name else None
            empty = np.zeros(self.case.image.shape[:2], bool)
            if truth is not None and self.answer(self.case.id, name, text):
                out.append(_Result(truth.copy(), 0.9, True))
            else:
                out.append(_Result(empty, 0.1, False))
        return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_fluoroseg(tmp_path_factory.mktemp("toy") / "fs", n_train=0, n_val=6, size=48, seed=3)


def _paraphrase(toy: Path, answer, **kw) -> dict:
    ds = FluoroSegDataset(toy, "val")
    canon = {n: s.prompt for n, s in ds.structures.items()}
    pred = FakePredictor(ds, lambda c, n, t: t == canon[n] or answer(c, n, t))
    rows: list[dict] = []
    run_cases(
        pred, ds, EvalOptions(clicks=(), phrasings="heldout", **kw), progress=False, paraphrase_rows=rows
    )
    return summarize_paraphrase(rows)


def test_paraphrase_drop_is_one_when_only_the_canonical_prompt_works(toy: Path) -> None:
    p = _paraphrase(toy, lambda c, n, t: False)
    assert set(p["per_structure"]) >= {"heart", "lungs", "left_lung", "right_lung"}
    for v in p["per_structure"].values():
        assert v["dice_canonical"] == pytest.approx(1.0)
        assert v["dice_paraphrase"] == pytest.approx(0.0)
        assert v["relative_drop"] == pytest.approx(1.0)
        assert v["above_floor"]
    assert p["overall"]["relative_drop"] == pytest.approx(1.0)
    assert p["overall"]["n_structures"] == len(p["per_structure"])
    assert p["worst_phrasings"]
    assert p["worst_phrasings"][0]["relative_drop"] == pytest.approx(1.0)


def test_paraphrase_drop_is_zero_when_phrasings_answer_like_the_canonical_prompt(toy: Path) -> None:
    p = _paraphrase(toy, lambda c, n, t: True)
    assert p["overall"]["relative_drop"] == pytest.approx(0.0)
    assert all(v["relative_drop"] == pytest.approx(0.0) for v in p["per_structure"].values())


def test_paraphrase_drop_counts_the_cases_a_phrasing_loses(toy: Path) -> None:
    """Phrasings work on cases 0, 2, 4 only: each phrasing's Dice is the share of its cases it gets."""
    ds = FluoroSegDataset(toy, "val")
    ok_cases = {ds.case_id(i) for i in range(0, len(ds), 2)}
    p = _paraphrase(toy, lambda c, n, t: c in ok_cases)
    heart = p["per_structure"]["heart"]  # present in every toy image
    assert heart["n"] == len(ds)
    assert heart["relative_drop"] == pytest.approx(1 - len(ok_cases) / len(ds))


def test_max_phrasings_is_a_fixed_sample_and_restricting_structures_works(toy: Path) -> None:
    every = heldout_phrasings("left_lung", "left lung")
    three = heldout_phrasings("left_lung", "left lung", 3)
    assert len(every) > 3
    assert len(three) == 3
    assert set(three) <= set(every)
    assert three == heldout_phrasings("left_lung", "left lung", 3)  # deterministic
    assert [t for t in every if t in three] == list(three)  # vocabulary order kept
    assert "left lung" not in every
    assert heldout_phrasings("no_such_structure", "x") == ()
    p = _paraphrase(toy, lambda c, n, t: False, max_phrasings=1, phrasing_structures=("heart",))
    assert set(p["per_structure"]) == {"heart"}
    assert len(p["per_structure"]["heart"]["phrasings"]) == 1


def test_summary_floor_negative_drops_and_worst_phrasings() -> None:
    rows = [
        {
            "case": "a",
            "structure": "A",
            "canonical": "a",
            "dice_canonical": 0.8,
            "phrasings": {"p1": 0.4, "p2": 0.8},
        },
        {"case": "a", "structure": "B", "canonical": "b", "dice_canonical": 0.2, "phrasings": {"q": 0.0}},
        {"case": "a", "structure": "C", "canonical": "c", "dice_canonical": 0.9, "phrasings": {"r": 0.99}},
    ]
    p = summarize_paraphrase(rows, floor=0.5)
    assert p["per_structure"]["A"]["relative_drop"] == pytest.approx(0.25)
    assert p["per_structure"]["A"]["worst_phrasing"] == "p1"
    assert not p["per_structure"]["B"]["above_floor"]
    assert p["per_structure"]["C"]["relative_drop"] == pytest.approx(-0.1)
    assert p["overall"]["relative_drop"] == pytest.approx((0.25 - 0.1) / 2)
    assert p["overall"]["max_relative_drop"] == pytest.approx(0.25)
    assert (p["overall"]["n_structures"], p["overall"]["n_structures_below_floor"]) == (2, 1)
    w = p["worst_phrasings"][0]
    assert (w["structure"], w["phrasing"], w["relative_drop"]) == ("A", "p1", pytest.approx(0.5))
    assert all(x["structure"] != "B" for x in p["worst_phrasings"])
    assert summarize_paraphrase([])["overall"]["relative_drop"] is None


def test_assumed_absent_prompts_on_a_labelled_folder(tmp_path: Path) -> None:
    from train.labelled_folder import LabelledFolder

    ds = LabelledFolder(write_toy_folder(tmp_path / "chest", n=3, size=48))
    assumed = ("femur_left", "left_foot", "lungs")  # lungs is present: never counted absent
    fire = FakePredictor(ds, lambda c, n, t: True)
    fire.predict = (
        lambda prompts, return_logits=False: [  # every prompt "found"
            _Result(np.ones(fire.case.image.shape[:2], bool), 0.9, True) for _ in prompts
        ]
    )
    rows = run_cases(fire, ds, EvalOptions(clicks=(), assume_absent=assumed), progress=False)
    s = summarize(rows)
    assert s["n_absent"] == 3 * 2
    assert s["absent_fp_rate"] == pytest.approx(1.0)
    assert {r["prompt"] for r in rows if not r["present"]} == {"left femur", "left foot bones"}
    quiet = FakePredictor(ds, lambda c, n, t: True)
    assert summarize(run_cases(quiet, ds, EvalOptions(clicks=(), assume_absent=assumed), False))[
        "absent_fp_rate"
    ] == pytest.approx(0.0)
    with pytest.raises(KeyError, match="unknown structure"):
        run_cases(quiet, ds, EvalOptions(clicks=(), assume_absent=("femurr_left",)), False)


def test_absent_sample_is_a_fixed_subset() -> None:
    names = [f"s{i}" for i in range(20)]
    a = _sample_absent(names, "root/case_00001/000000", 5)
    assert len(a) == 5
    assert set(a) <= set(names)
    assert a == sorted(a, key=names.index)
    assert a == _sample_absent(names, "root/case_00001/000000", 5)
    assert _sample_absent(names, "x", 0) == names
    assert _sample_absent(names[:3], "x", 5) == names[:3]


def test_capped_runs_spread_over_the_set_and_report_the_bodies_they_used(tmp_path: Path) -> None:
    from train.evaluate import _case_indices

    root = write_toy_fluoroseg(tmp_path / "fs", n_train=0, n_val=10, size=32)
    cases = (root / "val.txt").read_text().split()
    for k, case in enumerate(cases):
        f = root / case / "case.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "body": f"b{k // 5}"}))  # b0 then b1
    ds = FluoroSegDataset(root, "val")
    assert _case_indices(ds, EvalOptions(max_cases=3)) == [0, 1, 2]
    assert _case_indices(ds, EvalOptions(max_cases=3, case_sample="spread")) == [0, 4, 9]
    assert _case_indices(ds, EvalOptions(max_cases=20, case_sample="spread")) == list(range(10))
    assert calibration_bodies([root], "val") == (["b0", "b1"], [])
    first = {f"fs/{c}" for c in cases[:3]}
    assert calibration_bodies([root], "val", first) == (["b0"], [])


def test_tool_groups_pool_the_screw_categories() -> None:
    from train.eval_suite import tool_groups

    def row(s: str, d: float) -> dict:
        return {"structure": s, "present": True, "dice": d, "predicted_present": d > 0}

    rows = [row("bone_screw", 1.0), row("pedicle_screw", 0.0), row("pedicle_screw", 0.5), row("k_wire", 0.7)]
    rows.append({"structure": "guidewire", "present": False, "false_positive": True})
    g = tool_groups(rows)
    assert g["screws"]["n"] == 3
    assert g["screws"]["dice"] == pytest.approx(0.5)
    assert g["screws"]["per_category"]["pedicle_screw"] == {"n": 2, "dice": pytest.approx(0.25)}
    assert g["screws"]["per_category"]["cannulated_screw"] == {"n": 0, "dice": None}
    assert g["k_wire"]["dice"] == pytest.approx(0.7)
    assert g["guidewire"] == {**g["guidewire"], "n": 0, "dice": None}


def test_target_table_met_missed_and_unmeasured() -> None:
    from train.eval_suite import TARGETS, markdown, target_table

    results = {
        "real_chest": {
            "per_prompt": {
                "lungs": {"dice": 0.86},
                "left_lung": {"dice": 0.79},
                "right_lung": {"dice": 0.80},
            },
            "absent_fp_rate": 0.06,
            "paraphrase": {"overall": {"relative_drop": -0.01}},
        },
        "tools": {"tool_groups": {"k_wire": {"dice": 0.6}, "screws": {"dice": None}}, "absent_fp_rate": 0.05},
    }
    rows = {r["key"]: r for r in target_table(results)}
    assert len(rows) == len(TARGETS) == 13
    assert rows["chest_lungs"]["met"] is True
    assert rows["chest_left_lung"]["met"] is False  # 0.79 < 0.80
    assert rows["chest_right_lung"]["met"] is True  # the bound itself meets a >= target
    assert rows["absent_fp_real_chest"]["met"] is False  # 0.06 > 0.05
    assert rows["absent_fp_tools"]["met"] is True  # <= target at the bound
    assert rows["paraphrase_drop_real_chest"]["met"] is True  # paraphrases did better
    assert rows["tool_k_wire"]["met"] is True
    assert rows["tool_screws"]["measured"] is None
    assert rows["tool_screws"]["met"] is None
    assert rows["heldout_body_dice"]["met"] is None  # split not evaluated
    md = markdown(list(rows.values()), {"checkpoint": "m.safetensors"})
    assert "5 of 7 measured targets met (6 not measured)" in md
    assert "| Real chest: left lung Dice | 0.790 | >= 0.80 | **no** |" in md
    assert "| Tools: screws Dice (bone, cannulated, pedicle) | n/a | >= 0.50 | n/a |" in md


def test_calibration_refuses_a_held_out_body(tmp_path: Path) -> None:
    root = write_toy_fluoroseg(tmp_path / "fs", n_train=1, n_val=2, size=32)
    for case in (root / "val.txt").read_text().split():
        f = root / case / "case.json"
        info = json.loads(f.read_text())
        f.write_text(json.dumps({**info, "body": "fracsegnet_005", "heldout_body": True}))
    assert calibration_bodies([root], "val") == (["fracsegnet_005"], ["fracsegnet_005"])
    assert calibration_bodies([root], "train") == ([], [])
    with pytest.raises(SystemExit, match="held-out bodies \\(fracsegnet_005\\)"):
        calibrate_checkpoint(
            str(tmp_path / "never_read.safetensors"), str(root), "val", EvalOptions(clicks=())
        )


def _toy_set(root: Path, body: str, seed: int) -> Path:
    write_toy_fluoroseg(root, n_train=0, n_val=3, size=48, seed=seed)
    for case in (root / "val.txt").read_text().split():
        f = root / case / "case.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "body": body, "heldout_body": False}))
    info = {
        "n_images": 3,
        "n_cases": 3,
        "config": {"seed": seed},
        "seconds_total": 0.0,
        "cases_per_body": {body: 3},
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def test_split_options_give_each_split_its_prompts() -> None:
    """The cheap check of the suite's per-split setup (the slow test below runs it whole)."""
    from train.eval_suite import CHEST_ASSUMED_ABSENT, TOOL_GROUPS, split_options

    chest = split_options("real_chest", 5, 16, 2)
    assert chest.assume_absent == CHEST_ASSUMED_ABSENT
    assert (chest.phrasings, chest.max_phrasings, chest.max_cases, chest.max_absent) == ("heldout", 2, 5, 16)
    assert chest.clicks == ()
    tools = split_options("tools", 0, 0, 0)
    assert set(tools.phrasing_structures) == {m for ms in TOOL_GROUPS.values() for m in ms}
    assert tools.assume_absent == ()
    body = split_options("heldout_body", 0, 0, 0)
    assert body.phrasing_structures == ()
    assert body.assume_absent == ()


@pytest.mark.slow  # ~20 CPU-s (four model loads); the parts have cheap tests above
def test_suite_end_to_end_on_toy_sets(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole run on toy stand-ins for the sets, with the shared small random model: every JSON
    and the table appear, the calibration covers the (one) training body, the input file is untouched."""
    import train.eval_suite as suite

    monkeypatch.setattr(suite, "training_bodies", lambda: ["toybody"])
    sets = tmp_path / "sets"
    _toy_set(sets / "heldout_body", "fracsegnet_005", 1)
    _toy_set(sets / "tools" / "general", "toybody", 2)
    _toy_set(sets / "tools" / "vascular", "toybody", 4)
    _toy_set(sets / "calib" / "toybody", "toybody", 3)
    chest = write_toy_folder(tmp_path / "chest", n=2, size=48)
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    out = tmp_path / "out"
    rc = suite.main(
        [
            "run",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "--sets-dir",
            str(sets),
            "--chest",
            str(chest),
        ]
    )
    assert rc == 0
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    for f in (
        "real_chest.json",
        "heldout_body.json",
        "tools.json",
        "calibration.json",
        "targets.json",
        "targets.md",
    ):
        assert (out / f).is_file(), f
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["bodies"] == ["toybody"]
    assert cal["training_bodies_missing"] == []
    tools = json.loads((out / "tools.json").read_text())
    assert tools["presence_threshold"] == pytest.approx(cal["presence_threshold"])
    assert set(tools["tool_groups"]) == {"k_wire", "screws", "guidewire"}
    assert set(tools["paraphrase"]["per_structure"]) <= {"k_wire"}  # tools only on the tools split
    chest_json = json.loads((out / "real_chest.json").read_text())
    assert chest_json["n_absent"] == 2 * len(suite.CHEST_ASSUMED_ABSENT)
    assert set(chest_json["paraphrase"]["per_structure"]) == {"lungs", "left_lung", "right_lung"}
    report = json.loads((out / "targets.json").read_text())
    assert [r["key"] for r in report["targets"]] == [t.key for t in suite.TARGETS]
    md = (out / "targets.md").read_text()
    assert "| Held-out body: mean Dice, structures > 1% of the image |" in md
    assert "calib" in md


def test_suite_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from train.eval_suite import main

    assert main(["run", "--checkpoint", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    ck = tmp_path / "m.safetensors"
    ck.write_bytes(b"x")
    assert (
        main(
            [
                "run",
                "--checkpoint",
                str(ck),
                "--out",
                str(tmp_path),
                "--chest",
                str(tmp_path),
                "--only",
                "lungs",
            ]
        )
        == 2
    )
    assert "unknown split(s) lungs" in capsys.readouterr().err


def test_eval_cli_names_an_unknown_assumed_absent_structure(tmp_path: Path) -> None:
    from train.cli import main

    chest = write_toy_folder(tmp_path / "chest", n=1, size=32)
    with pytest.raises(
        SystemExit, match="--assume-absent: unknown structure name 'femurr_left'; did you mean"
    ):
        main(["eval", "--data", str(chest), "--assume-absent", "femurr_left"])
