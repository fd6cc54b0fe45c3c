"""Opening a data set by its layout, and the cached text features the trainer feeds the model.

Two on-disk layouts are read behind one small interface (``train.dataset.XrayDataset``):

* the labelled X-ray folder (``images/``, ``masks/<structure>/``, ``prompts.json``), documented in
  ``../shared/data/chest-xray-hannover/README.md``; any folder in that layout works;
* the FluoroSeg layout our synthetic engine writes (``docs/fluoroseg_format.md``).

A case knows which structures are *present* (non-empty mask) and which are *known absent*. Only
labels that were actually annotated can be absent: a labelled folder says nothing about what it
did not annotate, so absence there comes only from an existing all-zero mask file; FluoroSeg lists
every label of its CT, so an empty projection there is a real "not in view". Teaching
"absent" for an unannotated but visible structure would teach the model to ignore anatomy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from fluorosam_rt.text.base import TextEncoder, normalize_prompt
from train.dataset import XrayDataset
from train.fluoroseg import FluoroSegDataset, is_fluoroseg
from train.labelled_folder import LabelledFolder


def open_dataset(path: str | Path, prompts: str | Path | None = None) -> XrayDataset:
    """Pick the reader by layout: FluoroSeg if its annotation files exist, else the labelled folder."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    if is_fluoroseg(root):
        ds = FluoroSegDataset(root)
        if prompts is not None:
            ds.override_prompts(json.loads(Path(prompts).read_text(encoding="utf-8")))
        return ds
    return LabelledFolder(root, prompts)


# -- text features -------------------------------------------------------------------------------------
class TextFeatureBank:
    """Normalised prompt text -> frozen text-encoder feature, computed once for every phrasing.

    The trainer never runs the text encoder per step; it indexes this table. The file is keyed by
    the encoder's identity, so features from another encoder are never reused.
    """

    def __init__(self, texts: Sequence[str], features: torch.Tensor, identity: str) -> None:
        self.texts = [normalize_prompt(t) for t in texts]
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.features = features.float()
        self.identity = identity

    def __len__(self) -> int:
        return len(self.texts)

    def idx(self, text: str) -> int:
        return self.index[normalize_prompt(text)]

    @classmethod
    def build(
        cls, texts: Iterable[str], encoder: TextEncoder, cache_file: str | Path | None = None
    ) -> TextFeatureBank:
        uniq = sorted({normalize_prompt(t) for t in texts})
        ident = encoder.identity()
        if cache_file is not None and Path(cache_file).is_file():
            saved = torch.load(cache_file, map_location="cpu", weights_only=True)
            if saved.get("identity") == ident and set(uniq) <= set(saved["texts"]):
                return cls(saved["texts"], saved["features"], ident)
        with torch.no_grad():
            feats = encoder.encode(uniq).cpu().float()
        bank = cls(uniq, feats, ident)
        if cache_file is not None:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"texts": uniq, "features": feats, "identity": ident}, cache_file)
        return bank


def all_prompt_texts(datasets: Iterable[XrayDataset]) -> list[str]:
    """Every text training may use: prompts and phrasings, minus the vocabulary's held-out phrasings
    (they must not reach the text-feature bank, nor the VQ codebook snapped from it)."""
    from train.synth.vocabulary import default_heldout_keys

    heldout = default_heldout_keys()
    out: set[str] = set()
    for ds in datasets:
        for info in ds.structures.values():
            out.add(info.prompt)
            out.update(p for p in info.phrasings if normalize_prompt(p) not in heldout)
    return sorted(out)


# -- geometry shared by training and evaluation --------------------------------------------------------
def mask_to_model_frame(mask: np.ndarray, img_size: int) -> np.ndarray:
    """Bool mask at the image's size -> float [S, S] in the padded model frame (area-resampled).

    Mirrors Preprocessor's geometry (longest side to S, pad bottom/right), so a target lines up
    with the low-res logits exactly as the predictor maps them back.
    """
    from fluorosam_rt.preprocess import resized_shape

    h, w = mask.shape
    (rh, rw), _ = resized_shape(h, w, img_size)
    small = cv2.resize(mask.astype(np.float32), (rw, rh), interpolation=cv2.INTER_AREA)
    out = np.zeros((img_size, img_size), np.float32)
    out[:rh, :rw] = small
    return out
