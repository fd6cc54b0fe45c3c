"""Prompt sampling for training, and the deterministic click protocol used by evaluation.

Per image the trainer draws K prompts: present structures in one of their *training* phrasings (the
canonical prompt half of the time, so the node's own vocabulary is always well covered; a held-out
phrasing of the vocabulary is never drawn, whatever a data set's categories.json lists), and,
with some probability, an *absent* structure whose target is empty, so that the model learns to
say "not here" through a low predicted IoU. Clicks are added in the training step itself,
because the best clicks depend on the model's current mistakes (error-region sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fluorosam_rt.text.base import normalize_prompt
from train.augment import AugmentConfig, augment
from train.data import TextFeatureBank, mask_to_model_frame
from train.dataset import StructureInfo, XrayDataset
from train.synth.vocabulary import default_heldout_keys


@dataclass(frozen=True)
class PromptSamplingConfig:
    prompts_per_image: int = 6
    p_absent: float = 0.15  # probability that a prompt slot is an absent structure
    p_canonical: float = 0.5  # probability of the canonical phrasing (else a random alternative)
    p_points: float = 0.5  # probability that a training step adds clicks
    max_points: int = 8
    min_area_fraction: float = 0.001  # smaller present masks are not used as positives
    kind_weights: tuple[tuple[str, float], ...] = (("structure", 1.0), ("group", 2.0), ("tool", 3.0))


def choose_prompts(
    ds: XrayDataset, i: int, rng: np.random.Generator, cfg: PromptSamplingConfig
) -> list[tuple[str, bool]]:
    """K (structure, present) pairs for case i. Groups and tools are up-weighted: they are what a
    clinician asks for most (lungs, spine, K-wire) and are rarer among ~100 leaf labels."""
    present = [n for n in ds.present(i) if n in ds.structures]
    area = getattr(ds, "area_fraction", None)
    if area is not None:
        present = [n for n in present if area(i, n) >= cfg.min_area_fraction]
    absent = [n for n in ds.absent(i) if n in ds.structures]
    weights = dict(cfg.kind_weights)
    out: list[tuple[str, bool]] = []
    if present:
        w = np.array([weights.get(ds.structures[n].kind, 1.0) for n in present], np.float64)
        w /= w.sum()
    for _ in range(cfg.prompts_per_image):
        if absent and (not present or rng.random() < cfg.p_absent):
            out.append((str(rng.choice(absent)), False))
        elif present:
            out.append((str(present[int(rng.choice(len(present), p=w))]), True))
    return out


def training_alternatives(info: StructureInfo) -> list[str]:
    """The phrasings training may draw besides the prompt: never one the vocabulary holds out.

    Data sets written before the split list held-out phrasings among their ``phrasings``; filtering here
    keeps them out of training whatever the data set says.
    """
    heldout = default_heldout_keys()
    return [p for p in info.phrasings if p != info.prompt and normalize_prompt(p) not in heldout]


def choose_text(ds: XrayDataset, name: str, rng: np.random.Generator, cfg: PromptSamplingConfig) -> str:
    info = ds.structures[name]
    alts = training_alternatives(info)
    if not alts or rng.random() < cfg.p_canonical:
        return info.prompt
    return str(rng.choice(alts))


class PromptedImages(Dataset):
    """Item = one augmented, preprocessed image with K prompts and their targets in the model frame.

    Randomness comes from ``rng([seed, epoch, index])``, so an item is the same whatever the worker
    count or rank; that is what makes runs reproducible and DDP comparable to one process.
    """

    def __init__(
        self,
        ds: XrayDataset,
        bank: TextFeatureBank,
        preprocessor,
        sampling: PromptSamplingConfig,
        aug: AugmentConfig,
        seed: int = 0,
        max_side: int = 512,
    ) -> None:
        self.ds = ds
        self.bank = bank
        self.pre = preprocessor
        self.sampling = sampling
        self.aug = aug
        self.seed = seed
        self.epoch = 0
        self.max_side = max_side

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        chosen = choose_prompts(self.ds, index, rng, self.sampling)
        case = self.ds.load(index, sorted({n for n, p in chosen if p}))
        img = np.asarray(case.image, np.float32)
        if img.ndim == 3:
            img = img.mean(-1)
        h, w = img.shape
        stack = np.zeros((len(chosen), h, w), bool)
        for k, (name, present) in enumerate(chosen):
            if present and name in case.masks:
                stack[k] = case.masks[name]
        # Work at a bounded size: augmentations are per-pixel and the model sees img_size anyway.
        if max(h, w) > self.max_side:
            s = self.max_side / max(h, w)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            stack = np.stack(
                [cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0 for m in stack]
            )
        img, stack = augment(img, stack, rng, self.aug)
        x, _ = self.pre(img)
        s = self.pre.img_size
        targets = np.stack([mask_to_model_frame(m, s) for m in stack]) if len(stack) else np.zeros((0, s, s))
        present = np.array([p for _, p in chosen], bool)
        # A present structure pushed out of view by crop or collimator is absent in this sample.
        present &= targets.reshape(len(chosen), -1).max(1) >= 0.5 if len(chosen) else present
        text_idx = [self.bank.idx(choose_text(self.ds, n, rng, self.sampling)) for n, _ in chosen]
        return {
            "image": x,
            "text_idx": torch.tensor(text_idx, dtype=torch.long),
            "targets": torch.from_numpy((targets >= 0.5).astype(np.uint8)),
            "present": torch.from_numpy(present),
        }


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack images; prompts of all images are flattened, with their image index kept."""
    k = [int(it["text_idx"].shape[0]) for it in items]
    return {
        "image": torch.stack([it["image"] for it in items]),
        "image_index": torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(k)]),
        "text_idx": torch.cat([it["text_idx"] for it in items]),
        "targets": torch.cat([it["targets"] for it in items]),
        "present": torch.cat([it["present"] for it in items]),
    }


# -- clicks -----------------------------------------------------------------------------------------
def sample_click(region: torch.Tensor, gen: torch.Generator) -> tuple[float, float] | None:
    """A random pixel (x, y) of a bool map, or None if it is empty."""
    idx = torch.nonzero(region.flatten(), as_tuple=False)
    if idx.numel() == 0:
        return None
    j = int(idx[torch.randint(idx.shape[0], (1,), generator=gen)].item())
    w = region.shape[-1]
    return float(j % w), float(j // w)


def training_clicks(
    targets: torch.Tensor, predictions: torch.Tensor, n_points: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n clicks per prompt: one positive inside the mask, then clicks in the error regions.

    targets/predictions are bool [K, S, S] in the model frame. An error click is positive on a
    missed pixel and negative on a false positive, chosen in proportion to the two areas, which is
    how a user corrects a text-only result. Prompts run out of errors repeat their last click.
    """
    k = targets.shape[0]
    coords = torch.zeros((k, n_points, 2), dtype=torch.float64)
    labels = torch.ones((k, n_points), dtype=torch.float64)
    for i in range(k):
        first = sample_click(targets[i], gen)
        if first is None:  # absent target: only negative clicks make sense
            first = sample_click(predictions[i], gen) or (0.0, 0.0)
            labels[i, 0] = 0.0
        coords[i, 0] = torch.tensor(first, dtype=torch.float64)
        fn = targets[i] & ~predictions[i]
        fp = predictions[i] & ~targets[i]
        n_fn, n_fp = int(fn.sum()), int(fp.sum())
        for j in range(1, n_points):
            if n_fn + n_fp == 0:
                coords[i, j], labels[i, j] = coords[i, j - 1], labels[i, j - 1]
                continue
            positive = float(torch.rand((), generator=gen)) < n_fn / (n_fn + n_fp)
            pt = sample_click(fn if positive else fp, gen)
            coords[i, j] = torch.tensor(pt, dtype=torch.float64)
            labels[i, j] = 1.0 if positive else 0.0
    return coords, labels


def eval_click(target: np.ndarray, prediction: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """The next deterministic evaluation click: the centre of the largest error region.

    The click goes to the pixel of the larger error (missed vs. false positive) that lies furthest
    from that error's boundary, i.e. where an annotator would click. With no error, None.
    """
    fn = target & ~prediction
    fp = prediction & ~target
    best: tuple[float, tuple[float, float], int] | None = None
    for region, label in ((fn, 1), (fp, 0)):
        if not region.any():
            continue
        dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        score = float(dist[y, x])
        if best is None or score > best[0]:
            best = (score, (float(x), float(y)), label)
    if best is None:
        return None
    return best[1], best[2]
