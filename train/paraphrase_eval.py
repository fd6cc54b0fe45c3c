"""Paraphrase robustness: how much Dice a structure loses when it is asked for in words training never saw.

``fluorosam-train eval ... --phrasings heldout`` decodes every present structure of a case once with the
data's canonical prompt and once with each of its held-out phrasings (or a deterministic sample of
``--max-phrasings`` of them), in the same decoder batch as the canonical prompt, so the image is encoded
once. The phrasings come from the vocabulary (``Category.heldout_phrasings``): that is the list training
excludes (``train.data.all_prompt_texts``), so none of them reached the text-feature bank.

Metric, per structure: ``relative_drop = 1 - dice_paraphrase / dice_canonical``, where ``dice_canonical``
is the mean canonical Dice over the structure's evaluated cases and ``dice_paraphrase`` the mean over its
phrasings of each phrasing's mean Dice on the same cases (negative when paraphrases do better). Overall:
the mean of the per-structure drops over structures whose canonical Dice is at least ``floor``
(``DEFAULT_FLOOR`` = 0.5): a model that cannot segment a structure from its canonical prompt has nothing to
lose, and a ratio of two small Dice values is noise, not robustness. Structures below the floor are counted
in ``n_structures_below_floor`` and keep their per-structure numbers.

JSON (the ``paraphrase`` key of the eval JSON; ``paraphrase_cases`` holds the rows):

| key | meaning |
| --- | --- |
| ``floor``, ``max_phrasings`` | the canonical-Dice floor and the phrasings cap (0: all) used |
| ``per_structure.<s>.canonical`` | the canonical prompt |
| ``per_structure.<s>.n`` | cases evaluated (present, with held-out phrasings) |
| ``per_structure.<s>.dice_canonical`` / ``.dice_paraphrase`` / ``.relative_drop`` | as above |
| ``per_structure.<s>.above_floor`` | whether it enters the overall mean |
| ``per_structure.<s>.phrasings.<text>.dice`` / ``.relative_drop`` | one phrasing, same cases |
| ``per_structure.<s>.worst_phrasing`` | the phrasing with the lowest Dice |
| ``overall.relative_drop`` | mean drop over structures above the floor (null if none) |
| ``overall.max_relative_drop`` | the largest of those drops |
| ``overall.n_structures`` / ``.n_structures_below_floor`` | structures in / out of the mean |
| ``worst_phrasings`` | up to 10 (structure, phrasing) pairs above the floor, largest drop first |
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Any

import numpy as np

from fluorosam_rt.text.base import normalize_prompt

DEFAULT_FLOOR = 0.5
N_WORST = 10


def heldout_phrasings(name: str, canonical: str, max_phrasings: int = 0) -> tuple[str, ...]:
    """The vocabulary's held-out phrasings of a structure, or a deterministic sample of them.

    The sample depends only on the structure name (a CRC32-seeded draw without replacement, kept in
    vocabulary order), so two runs, two models and two machines evaluate the same phrasings. Names the
    vocabulary does not know have none.
    """
    from train.synth.vocabulary import Vocabulary

    cat = Vocabulary.load().by_name.get(name)
    if cat is None:
        return ()
    canon = normalize_prompt(canonical)
    texts = [t for t in cat.heldout_phrasings if normalize_prompt(t) != canon]
    if max_phrasings <= 0 or max_phrasings >= len(texts):
        return tuple(texts)
    rng = np.random.default_rng(zlib.crc32(name.encode("utf-8")))
    keep = sorted(rng.choice(len(texts), size=max_phrasings, replace=False).tolist())
    return tuple(texts[i] for i in keep)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _drop(paraphrase: float | None, canonical: float | None) -> float | None:
    if paraphrase is None or canonical is None or canonical <= 0:
        return None
    return 1.0 - paraphrase / canonical


def summarize_paraphrase(
    rows: list[dict[str, Any]], floor: float = DEFAULT_FLOOR, max_phrasings: int = 0
) -> dict[str, Any]:
    """Aggregate paraphrase rows (``case``, ``structure``, ``canonical``, ``dice_canonical``,
    ``phrasings: {text: dice}``) into the JSON documented in the module docstring."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["structure"]].append(r)
    per: dict[str, dict[str, Any]] = {}
    for name, rs in sorted(groups.items()):
        canon = _mean([r["dice_canonical"] for r in rs])
        texts = sorted({t for r in rs for t in r["phrasings"]})
        phr: dict[str, dict[str, Any]] = {}
        for t in texts:
            d = _mean([r["phrasings"][t] for r in rs if t in r["phrasings"]])
            phr[t] = {"dice": d, "relative_drop": _drop(d, canon)}
        para = _mean([v["dice"] for v in phr.values() if v["dice"] is not None])
        worst = min(phr, key=lambda t: phr[t]["dice"]) if phr else None
        per[name] = {
            "canonical": rs[0]["canonical"],
            "n": len(rs),
            "dice_canonical": canon,
            "dice_paraphrase": para,
            "relative_drop": _drop(para, canon),
            "above_floor": canon is not None and canon >= floor,
            "worst_phrasing": worst,
            "phrasings": phr,
        }
    used = {n: v for n, v in per.items() if v["above_floor"] and v["relative_drop"] is not None}
    drops = [v["relative_drop"] for v in used.values()]
    worst_pairs = [
        {
            "structure": n,
            "phrasing": t,
            "dice": p["dice"],
            "dice_canonical": v["dice_canonical"],
            "relative_drop": p["relative_drop"],
        }
        for n, v in used.items()
        for t, p in v["phrasings"].items()
        if p["relative_drop"] is not None
    ]
    worst_pairs.sort(key=lambda w: (-w["relative_drop"], w["structure"], w["phrasing"]))
    return {
        "floor": floor,
        "max_phrasings": max_phrasings,
        "per_structure": per,
        "overall": {
            "relative_drop": _mean(drops),
            "max_relative_drop": max(drops) if drops else None,
            "n_structures": len(used),
            "n_structures_below_floor": len(per) - len(used),
        },
        "worst_phrasings": worst_pairs[:N_WORST],
    }
