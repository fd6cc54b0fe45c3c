"""Evaluation metrics and the JSON summary contract, on hand-made rows."""

from __future__ import annotations

import numpy as np
import pytest

from train.evaluate import dice_iou, summarize


def test_dice_iou_values() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True
    b[:, 2:7] = True  # overlap 30 of 50 + 50
    d, j = dice_iou(a, b)
    assert d == pytest.approx(0.6)
    assert j == pytest.approx(30 / 70)
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a))[0] == 0.0


def _row(case: str, s: str, dice: float, area: float, flag: bool = False, **kw) -> dict:
    r = {
        "case": case,
        "structure": s,
        "prompt": s.replace("_", " "),
        "present": True,
        "dice": dice,
        "iou": dice / (2 - dice),
        "area_fraction": area,
        "score": 0.5,
        "predicted_present": True,
        "dice_points": {"1": dice, "3": min(1.0, dice + 0.1), "8": min(1.0, dice + 0.2)},
        "iou_points": {"1": 0.0, "3": 0.0, "8": 0.0},
    }
    if flag:
        r["flags"] = {"mask_extends_outside_field_of_view": True}
    r.update(kw)
    return r


def test_summary_contract_and_means() -> None:
    rows = [
        _row("a", "lungs", 0.8, 0.3),
        _row("b", "lungs", 0.6, 0.3, flag=True),
        _row("a", "rib_left_3", 0.2, 0.005),
        {
            "case": "a",
            "structure": "brain",
            "prompt": "brain",
            "present": False,
            "score": 0.1,
            "predicted_present": False,
            "false_positive": False,
        },
        {
            "case": "b",
            "structure": "brain",
            "prompt": "brain",
            "present": False,
            "score": 0.9,
            "predicted_present": True,
            "false_positive": True,
        },
    ]
    s = summarize(rows)
    lungs = s["per_prompt"]["lungs"]
    assert lungs["dice"] == pytest.approx(0.7)
    assert lungs["dice_points"]["8"] == pytest.approx(0.9)
    assert lungs["dice_unflagged"] == pytest.approx(0.8)
    assert lungs["dice_flagged"] == pytest.approx(0.6)
    assert "brain" not in s["per_prompt"]  # per_prompt is over present cases only
    assert s["overall"]["dice"] == pytest.approx((0.8 + 0.6 + 0.2) / 3)
    assert s["overall"]["mean_structure_dice"] == pytest.approx((0.7 + 0.2) / 2)
    assert s["overall"]["mean_structure_dice_area_gt_1pct"] == pytest.approx(0.7)
    assert s["absent_fp_rate"] == pytest.approx(0.5)
    assert s["n_absent"] == 2


def test_summary_without_absent_prompts_reports_none() -> None:
    s = summarize([_row("a", "lungs", 0.5, 0.3)])
    assert s["absent_fp_rate"] is None
