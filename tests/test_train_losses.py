"""Losses: best-of-3, IoU targets, absent prompts."""

from __future__ import annotations

import torch

from train.losses import LossConfig, dice_loss, focal_loss, mask_iou, segmentation_loss


def _target() -> torch.Tensor:
    t = torch.zeros(16, 16)
    t[4:12, 4:12] = 1
    return t


def test_perfect_logits_give_near_zero_mask_loss() -> None:
    t = _target()
    logits = (t * 2 - 1) * 20
    assert float(dice_loss(logits, t)) < 1e-3
    assert float(focal_loss(logits, t, 0.25, 2.0)) < 1e-6
    assert float(mask_iou(logits, t)) == 1.0


def test_best_of_three_uses_the_best_output() -> None:
    t = _target()
    good = (t * 2 - 1) * 20
    bad = -good
    logits = torch.stack([bad, good, bad])[None]
    iou = torch.tensor([[0.0, 1.0, 0.0]])
    loss, parts = segmentation_loss(logits, iou, t[None], torch.tensor([True]), LossConfig())
    assert int(parts["best"][0]) == 1
    assert float(parts["mask"]) < 1e-3
    assert float(parts["iou"]) < 1e-6
    # the same outputs with the wrong prediction of IoU are penalised
    loss2, _ = segmentation_loss(
        logits, torch.tensor([[1.0, 0.0, 1.0]]), t[None], torch.tensor([True]), LossConfig()
    )
    assert float(loss2) > float(loss) + 0.5


def test_absent_prompt_wants_every_output_empty_and_zero_score() -> None:
    empty = torch.zeros(1, 16, 16)
    neg = torch.full((1, 3, 16, 16), -20.0)
    pos = neg.clone()
    pos[0, 2] = 20.0  # one output claims the whole image
    cfg = LossConfig()
    l_neg, p_neg = segmentation_loss(neg, torch.zeros(1, 3), empty, torch.tensor([False]), cfg)
    l_pos, _ = segmentation_loss(pos, torch.zeros(1, 3), empty, torch.tensor([False]), cfg)
    assert float(l_pos) > float(l_neg) + 0.1  # min-over-outputs would have hidden this
    l_score, _ = segmentation_loss(neg, torch.ones(1, 3), empty, torch.tensor([False]), cfg)
    assert float(l_score) > float(l_neg) + 0.5  # a high score on an absent prompt costs
    assert float(p_neg["mask"]) == 0.0  # no present prompts in the batch


def test_loss_normalisation_is_per_prompt_not_per_present_count() -> None:
    """Equal-size halves must average to the whole batch's loss (what makes DDP exact)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=g)
    iou = torch.rand(4, 3, generator=g)
    t = torch.stack([_target(), torch.zeros(16, 16), _target(), _target()])
    present = torch.tensor([True, False, True, True])
    cfg = LossConfig()
    whole, _ = segmentation_loss(logits, iou, t, present, cfg)
    a, _ = segmentation_loss(logits[:2], iou[:2], t[:2], present[:2], cfg)
    b, _ = segmentation_loss(logits[2:], iou[2:], t[2:], present[2:], cfg)
    torch.testing.assert_close(whole, (a + b) / 2)
