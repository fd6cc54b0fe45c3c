"""Prompt sampling, training clicks and the deterministic evaluation click."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.fluoroseg import FluoroSegDataset
from train.prompt_sampling import (
    PromptSamplingConfig,
    choose_prompts,
    choose_text,
    eval_click,
    training_clicks,
)
from train.toyset import write_toy_fluoroseg


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> FluoroSegDataset:
    return FluoroSegDataset(write_toy_fluoroseg(tmp_path_factory.mktemp("s") / "fs", 6, 0, 48), "train")


def test_choose_prompts_marks_presence_correctly(ds: FluoroSegDataset) -> None:
    cfg = PromptSamplingConfig(prompts_per_image=50, p_absent=0.3)
    seen_absent = False
    for i in range(len(ds)):
        present, absent = set(ds.present(i)), set(ds.absent(i))
        for name, is_present in choose_prompts(ds, i, np.random.default_rng(i), cfg):
            assert (name in present) if is_present else (name in absent)
            seen_absent |= not is_present
    assert seen_absent  # some toy images lack the K-wire


def test_choose_text_uses_phrasings(ds: FluoroSegDataset) -> None:
    rng = np.random.default_rng(0)
    texts = {choose_text(ds, "lungs", rng, PromptSamplingConfig()) for _ in range(40)}
    assert texts == {"lungs", "both lungs"}


def test_training_clicks_first_inside_mask_then_on_errors() -> None:
    t = torch.zeros(1, 32, 32, dtype=torch.bool)
    t[0, 8:24, 8:24] = True
    pred = torch.zeros_like(t)
    pred[0, 8:24, 8:16] = True  # misses the right half
    pred[0, 0:4, 0:4] = True  # and has a false positive
    coords, labels = training_clicks(t, pred, 8, torch.Generator().manual_seed(0))
    x, y = coords[0, 0].long().tolist()
    assert t[0, y, x]
    assert labels[0, 0] == 1
    for (x, y), lb in zip(coords[0, 1:].long().tolist(), labels[0, 1:].tolist()):
        if lb == 1:
            assert t[0, y, x]
            assert not pred[0, y, x]
        else:
            assert pred[0, y, x]
            assert not t[0, y, x]


def test_eval_click_goes_to_the_centre_of_the_largest_error() -> None:
    t = np.zeros((40, 40), bool)
    t[5:35, 5:35] = True
    pred = np.zeros_like(t)
    pred[5:35, 5:20] = True  # misses x in [20, 35)
    (x, y), label = eval_click(t, pred)
    assert label == 1
    assert 25 <= x <= 29
    assert 10 <= y <= 30
    assert t[int(y), int(x)]
    assert not pred[int(y), int(x)]
    assert eval_click(t, t) is None
    (x2, y2), label2 = eval_click(np.zeros_like(t), t)
    assert label2 == 0
    assert t[int(y2), int(x2)]
    assert eval_click(t, pred) == ((x, y), label)  # deterministic
