"""Prompt phrasings as people type them: expansion of the vocabulary, the held-out split, and training
sampling that never draws a held-out phrasing."""

from __future__ import annotations

import json
import random
import re
import statistics

import numpy as np
import pytest

from fluorosam_rt.phrasings import Phrasing, expand_entry, expand_vocabulary, split_heldout
from fluorosam_rt.text.base import normalize_prompt
from train.data import all_prompt_texts
from train.dataset import StructureInfo
from train.prompt_sampling import PromptSamplingConfig, choose_text
from train.synth.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def keys(texts) -> set[str]:
    return {normalize_prompt(t) for t in texts}


def test_enough_phrasings_per_kind_and_entry(vocab: Vocabulary) -> None:
    for kind in ("structure", "group", "tool"):
        counts = [len(c.phrasings) for c in vocab.categories if c.kind == kind]
        assert statistics.mean(counts) >= 20, (kind, statistics.mean(counts))
        assert min(counts) >= 12, (kind, min(counts))


def test_laterality_numbering_plural_and_misspelling_variants(vocab: Vocabulary) -> None:
    femur = keys(vocab.get("femur_left").phrasings)
    wanted = ("L femur", "the patient's left femur", "femur, left", "lt femur", "left femoral bone")
    wanted += ("left femer",)
    for t in wanted:
        assert normalize_prompt(t) in femur, t
    l3 = keys(vocab.get("vertebrae_L3").phrasings)
    assert {"l3", "l-3", "third lumbar vertebra", "3rd lumbar vertebra", "lumbar vertebra 3"} <= l3
    assert {"t12", "twelfth thoracic vertebra", "d12"} <= keys(vocab.get("vertebrae_T12").phrasings)
    assert {"left 3rd rib", "third left rib", "rib 3 on the left"} <= keys(vocab.get("rib_left_3").phrasings)
    assert {"k-wires", "kirshner wire", "kwire"} <= keys(vocab.get("k_wire").phrasings)
    assert {"both femurs", "left and right femur", "femur"} <= keys(vocab.get("femurs").phrasings)
    every = keys(p for c in vocab.categories for p in c.phrasings)
    for typo in ("femer", "humerous", "clavical", "vertabrae", "kirshner wire", "lumber spine"):
        assert any(typo in k for k in every), typo


def test_lateral_entries_never_name_the_other_side(vocab: Vocabulary) -> None:
    """Patient-side convention: a left entry's phrasing must not say right (nor R/rt), and vice versa."""
    for c in vocab.categories:
        side = c.prompt.split(" ")[0]
        if side not in ("left", "right"):
            continue
        other = {"left": r"\b(right|r|rt)\b", "right": r"\b(left|l|lt)\b"}[side]
        for p in c.phrasings:
            assert not re.search(other, p.lower()), (c.name, p)


def test_every_phrasing_names_one_entry_and_never_another_entrys_prompt(vocab: Vocabulary) -> None:
    owner: dict[str, str] = {normalize_prompt(c.prompt): c.name for c in vocab.categories}
    assert len(owner) == len(vocab.categories)
    for c in vocab.categories:
        for k in keys(c.phrasings):
            assert owner.setdefault(k, c.name) == c.name, (k, c.name, owner[k])
    # the hand-written lists say what they mean: none is silently dropped as ambiguous
    for c in vocab.categories:
        assert keys(c.synonyms) <= keys(c.phrasings) | {normalize_prompt(c.prompt)}, c.name


def test_split_is_disjoint_about_a_fifth_and_holds_out_each_kind_of_variant(vocab: Vocabulary) -> None:
    expanded = expand_vocabulary(vocab._doc)
    total = held = 0
    for c in vocab.categories:
        tr, ho = keys(c.train_phrasings), keys(c.heldout_phrasings)
        assert not tr & ho
        assert tr | ho == keys(c.phrasings)
        assert normalize_prompt(c.prompt) not in ho
        if c.synonyms:  # the most common alternative is always trained
            assert normalize_prompt(c.synonyms[0]) in tr
        total, held = total + len(c.phrasings), held + len(ho)
        sources = {p.source for p in expanded[c.name].phrasings if p.key in ho}
        n_lat = sum(p.source == "laterality" for p in expanded[c.name].phrasings)
        n_err = sum(p.source in ("misspelling", "typo") for p in expanded[c.name].phrasings)
        if n_lat >= 2:
            assert "laterality" in sources, c.name
        if n_err >= 2:
            assert sources & {"misspelling", "typo"}, c.name
    assert 0.17 <= held / total <= 0.23, held / total
    # no held-out phrasing is anyone's training phrasing or prompt
    trained = keys(p for c in vocab.categories for p in (c.prompt, *c.train_phrasings))
    assert not trained & vocab.heldout_keys


def test_split_is_stable_under_order_and_additions(vocab: Vocabulary) -> None:
    doc = vocab._doc
    entry = next(e for e in doc["structures"] if e["name"] == "femur_left")
    items = expand_entry(entry, "structure", misspellings=doc["misspellings"])
    a = split_heldout("femur_left", items)
    assert split_heldout("femur_left", list(reversed(items))) == a
    shuffled = list(items)
    random.Random(0).shuffle(shuffled)
    assert split_heldout("femur_left", shuffled) == a
    # one more phrasing moves at most one other in or out
    new = Phrasing("left femoral diaphysis", "synonym", "left femoral diaphysis")
    b = split_heldout("femur_left", [*items, new])
    assert len((a - b) | {k for k in b - a if k != "left femoral diaphysis"}) <= 1
    # and loading twice gives the same split everywhere
    again = Vocabulary.load()
    assert [c.heldout_phrasings for c in again.categories] == [c.heldout_phrasings for c in vocab.categories]


def test_training_sampler_never_draws_a_heldout_phrasing(vocab: Vocabulary) -> None:
    """Even a data set whose categories.json still lists every phrasing (written before the split)."""

    class Stale:
        def __init__(self) -> None:
            self.structures = {
                c.name: StructureInfo(c.name, c.prompt, c.phrasings, c.kind)
                for c in vocab.categories
                if c.name in ("femur_left", "vertebrae_L3", "k_wire", "lungs", "heart", "rib_right_7")
            }

    ds, cfg, rng = Stale(), PromptSamplingConfig(p_canonical=0.2), np.random.default_rng(0)
    for name in ds.structures:
        drawn = keys(choose_text(ds, name, rng, cfg) for _ in range(1500))
        assert not drawn & vocab.heldout_keys, name
        trained = keys(vocab.get(name).train_phrasings)
        assert len(drawn & trained) >= 0.8 * len(trained), name  # and training phrasings are all used
    assert not keys(all_prompt_texts([ds])) & vocab.heldout_keys  # nor reach the text-feature bank


def test_categories_json_separates_training_and_heldout_phrasings(vocab: Vocabulary) -> None:
    cats = json.loads(json.dumps(vocab.coco_categories()))
    femur = next(c for c in cats if c["name"] == "femur_left")
    cat = vocab.get("femur_left")
    assert femur["phrasings"] == list(cat.train_phrasings)
    assert femur["heldout_phrasings"] == list(cat.heldout_phrasings)
    assert femur["heldout_phrasings"]


def test_user_tools_expand_their_own_name_once(vocab: Vocabulary) -> None:
    v1, ids = vocab.with_user_tools(["Schanz pin", "Schanz pin"], ["titanium"] * 2)
    pin = v1.by_id[ids[0]]
    assert pin.prompt == "Schanz pin"
    assert "tool" in pin.phrasings
    assert "Schanz pins" in pin.phrasings
    assert pin.synonyms == ("tool", *vocab.get("custom_tool").synonyms)
    # two user tools cannot both be "tool": the shared words name neither
    v2, ids = vocab.with_user_tools(["Schanz pin", "cage"], ["titanium"] * 2)
    assert "tool" not in v2.by_id[ids[0]].phrasings
    assert "tool" not in v2.by_id[ids[1]].phrasings
    assert "cages" in v2.by_id[ids[1]].phrasings
