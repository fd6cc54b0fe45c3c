"""Losses: focal + Dice on the best of the 3 multimask outputs, IoU regression, VQ, absent prompts.

The best-of-3 ("minimum over outputs") lets the three outputs specialise on ambiguous prompts
(part, whole, group) instead of averaging them. For an absent prompt there is no ambiguity:
every output must be empty and every predicted IoU must be 0, so the presence gate
(predicted IoU below a calibrated threshold) has something to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    focal_weight: float = 20.0  # SAM's 20:1 focal:Dice ratio
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    vq_weight: float = 1.0
    absent_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-mask mean sigmoid focal loss; logits/target [..., H, W] -> [...]."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft Dice loss (used for present targets; see segmentation_loss for absent ones)."""
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    inter = (p * t).sum(-1)
    return 1 - (2 * inter + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard IoU of (logits > 0) with target; an empty target gives 0 (nothing to be right about)."""
    pred = logits > 0
    t = target > 0.5
    inter = (pred & t).flatten(-2).sum(-1).float()
    union = (pred | t).flatten(-2).sum(-1).float()
    iou = inter / union.clamp_min(1)
    return torch.where(t.flatten(-2).any(-1), iou, torch.zeros_like(iou))


def segmentation_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    present: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits [K, 3, L, L], iou_pred [K, 3], targets [K, L, L] float, present [K] bool.

    Returns the total (without VQ) and its parts for logging. The best output per present prompt
    is the one with the lowest mask loss; its index is also returned for click sampling.
    """
    t = targets[:, None].expand_as(logits).float()
    focal = cfg.focal_weight * focal_loss(logits.float(), t, cfg.focal_alpha, cfg.focal_gamma)
    per = focal + cfg.dice_weight * dice_loss(logits.float(), t)  # [K, 3]
    best = per.argmin(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    pres = present.to(per.dtype)
    # Normalised by the prompt count, not by the present/absent counts: those differ between
    # ranks, and only a per-prompt mean makes DDP's gradient average equal one big batch.
    k = max(1, logits.shape[0])
    mask_present = (per[rows, best] * pres).sum() / k
    # Absent prompts: focal only, on every output. Dice against an empty target keeps pushing
    # until sum(p) << 1 (logits near -14), saturating the outputs that only absent prompts train,
    # which then never win best-of-3 again; focal stops caring once a pixel is confidently empty.
    mask_absent = (focal.mean(1) * (1 - pres)).sum() / k
    with torch.no_grad():
        actual = mask_iou(logits, t)
    iou_l = F.mse_loss(iou_pred.float(), actual, reduction="none").mean(1)
    iou_loss = iou_l.mean()
    total = mask_present + cfg.absent_weight * mask_absent + cfg.iou_weight * iou_loss
    parts = {
        "mask": mask_present.detach(),
        "absent": mask_absent.detach(),
        "iou": iou_loss.detach(),
        "best": best.detach(),
        "actual_iou": actual[rows, best].detach(),
    }
    return total, parts
