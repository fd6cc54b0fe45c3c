"""``fluorosam-train eval``: metrics of a checkpoint on a FluoroSeg set or a labelled X-ray folder.

Evaluation runs the node's own ``Predictor`` (same preprocessing, same presence gate, masks at the
image's own size with padding removed), so the numbers describe what the node outputs.

Click protocol (deterministic): after the text-only result, each next click goes to the pixel of
the larger error region (missed or false-positive) that lies furthest from that region's border;
it is positive on a miss and negative on a false positive. Dice after 1, 3 and 8 clicks is
reported. The JSON layout is a contract that other scripts read; see ``EVAL_JSON_KEYS``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluorosam_rt.prompts import Prompt
from train.data import open_dataset
from train.dataset import ConcatXray, XrayDataset
from train.prompt_sampling import eval_click

CLICK_COUNTS = (1, 3, 8)
EVAL_JSON_KEYS = ("per_prompt", "overall", "absent_fp_rate", "cases")


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of bool masks; both empty counts as a perfect 1.0."""
    inter = float(np.logical_and(pred, target).sum())
    ps, ts = float(pred.sum()), float(target.sum())
    if ps + ts == 0:
        return 1.0, 1.0
    return 2 * inter / (ps + ts), inter / (ps + ts - inter)


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


@dataclass
class EvalOptions:
    clicks: tuple[int, ...] = CLICK_COUNTS
    min_area_fraction: float = 0.0  # present structures smaller than this are skipped
    max_cases: int = 0
    cases: str = "all"  # all | even | odd (calibration / held-out halves of one split)
    case_sample: str = "first"  # which max_cases: the first ones, or spread evenly over the set
    absent: bool = True
    structures: tuple[str, ...] = ()  # restrict to these names (empty: all)
    max_absent: int = 0  # absent prompts per case: all (0) or a deterministic sample of this many
    # Structures known to be absent from every case of a labelled folder that did not annotate them
    # (e.g. lower-limb bones on chest radiographs); prompts come from the vocabulary. Present wins.
    assume_absent: tuple[str, ...] = ()
    phrasings: str = "canonical"  # canonical | heldout (also decode held-out phrasings: paraphrase_eval)
    max_phrasings: int = 0  # held-out phrasings per structure: all (0) or a deterministic sample
    phrasing_structures: tuple[str, ...] = ()  # paraphrase-evaluate only these (empty: all present)
    paraphrase_floor: float = 0.5  # canonical Dice a structure needs to enter the overall paraphrase drop


def _case_indices(ds: XrayDataset, opt: EvalOptions) -> list[int]:
    idx = list(range(len(ds)))
    if opt.cases == "even":
        idx = idx[0::2]
    elif opt.cases == "odd":
        idx = idx[1::2]
    if opt.max_cases > 0 and opt.case_sample == "spread" and len(idx) > opt.max_cases:
        idx = [idx[k] for k in np.linspace(0, len(idx) - 1, opt.max_cases).round().astype(int)]
    elif opt.max_cases > 0:
        idx = idx[: opt.max_cases]
    return idx


def _sample_absent(names: list[str], case_id: str, k: int) -> list[str]:
    """All absent names, or k of them drawn by a stream seeded from the case id (run-independent)."""
    if k <= 0 or len(names) <= k:
        return names
    rng = np.random.default_rng(zlib.crc32(case_id.encode("utf-8")))
    keep = sorted(rng.choice(len(names), size=k, replace=False).tolist())
    return [names[i] for i in keep]


def _add_assumed_absent(ds: XrayDataset, names: Sequence[str]) -> None:
    """Give assumed-absent names the vocabulary's canonical prompt where the data set has none."""
    from train.dataset import StructureInfo
    from train.synth.vocabulary import Vocabulary

    voc = Vocabulary.load()
    for n in names:
        if n not in ds.structures:
            c = voc.get(n)  # raises with the closest names for an unknown one
            ds.structures[n] = StructureInfo(c.name, c.prompt, c.phrasings, c.kind)


def run_cases(
    predictor,
    ds: XrayDataset,
    opt: EvalOptions,
    progress: bool = True,
    paraphrase_rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (case, structure) with text-only and click metrics; absent prompts included.

    With ``opt.phrasings == "heldout"`` and a ``paraphrase_rows`` list, each present structure's
    held-out phrasings are decoded in the same batch and one row per (case, structure) is appended
    there (``train.paraphrase_eval``).
    """
    from tqdm import tqdm

    from train.paraphrase_eval import heldout_phrasings

    _add_assumed_absent(ds, opt.assume_absent)
    rows: list[dict[str, Any]] = []
    para_on = opt.phrasings == "heldout" and paraphrase_rows is not None
    phrasing_cache: dict[str, tuple[str, ...]] = {}
    for i in tqdm(_case_indices(ds, opt), desc="eval", unit="img", disable=not progress):
        case = ds.load(i)
        meta = ds.case_meta(i)
        pix = case.image
        h, w = pix.shape[:2]
        names = [n for n in case.masks if n in ds.structures and (not opt.structures or n in opt.structures)]
        names = [n for n in names if case.masks[n].sum() / float(h * w) >= opt.min_area_fraction]
        absent = [
            n for n in case.absent if n in ds.structures and (not opt.structures or n in opt.structures)
        ]
        absent += [n for n in opt.assume_absent if n not in case.masks and n not in absent]
        absent = _sample_absent(absent, case.id, opt.max_absent) if opt.absent else []
        prompts = [ds.structures[n].prompt for n in names + absent]
        if not prompts:
            continue
        para: list[tuple[str, str]] = []  # (structure, held-out phrasing)
        if para_on:
            for n in names:
                if opt.phrasing_structures and n not in opt.phrasing_structures:
                    continue
                if n not in phrasing_cache:
                    phrasing_cache[n] = heldout_phrasings(n, ds.structures[n].prompt, opt.max_phrasings)
                para += [(n, t) for t in phrasing_cache[n]]
        predictor.set_image(pix)
        everything = predictor.predict(prompts + [t for _, t in para], return_logits=bool(opt.clicks))
        results, para_results = everything[: len(prompts)], everything[len(prompts) :]
        flags = {k: v for k, v in meta.items() if isinstance(v, bool)}
        canon: dict[str, float] = {}
        for n, r in zip(names, results[: len(names)]):
            target = case.masks[n]
            d, j = dice_iou(r.mask, target)
            canon[n] = d
            rows.append(
                {
                    "case": case.id,
                    "structure": n,
                    "prompt": ds.structures[n].prompt,
                    "present": True,
                    "area_fraction": round(float(target.mean()), 6),
                    "dice": d,
                    "iou": j,
                    "score": r.score,
                    "predicted_present": r.present,
                    "actual_iou_best": dice_iou(r.logits > 0, target)[1] if r.logits is not None else j,
                    **({"flags": flags} if flags else {}),
                }
            )
        for n, r in zip(absent, results[len(names) :]):
            rows.append(
                {
                    "case": case.id,
                    "structure": n,
                    "prompt": ds.structures[n].prompt,
                    "present": False,
                    "score": r.score,
                    "predicted_present": r.present,
                    "false_positive": bool(r.present and r.mask.any()),
                }
            )
        if para:
            by_name: dict[str, dict[str, float]] = {}
            for (n, t), r in zip(para, para_results):
                by_name.setdefault(n, {})[t] = dice_iou(r.mask, case.masks[n])[0]
            for n, dices in by_name.items():
                paraphrase_rows.append(
                    {
                        "case": case.id,
                        "structure": n,
                        "canonical": ds.structures[n].prompt,
                        "dice_canonical": canon[n],
                        "phrasings": dices,
                    }
                )
        if opt.clicks and names:
            _click_rounds(predictor, ds, case, names, results[: len(names)], rows, opt.clicks)
    return rows


def _click_rounds(predictor, ds, case, names, first, rows, counts) -> None:
    """Add clicks one at a time to every present prompt of the case, recording Dice at ``counts``."""
    targets = [case.masks[n] for n in names]
    preds = [r.logits > 0 for r in first]
    clicks: list[list[tuple[float, float]]] = [[] for _ in names]
    labels: list[list[int]] = [[] for _ in names]
    by_row = {(r["case"], r["structure"]): r for r in rows if r.get("present")}
    for k in range(1, max(counts) + 1):
        for t, (tgt, pred) in enumerate(zip(targets, preds)):
            nxt = eval_click(tgt, pred)
            if nxt is None:  # already perfect: repeat the last click (or the mask centre) to keep k
                pt, lb = (clicks[t][-1], labels[t][-1]) if clicks[t] else (_centre(tgt), 1)
            else:
                pt, lb = nxt
            clicks[t].append(pt)
            labels[t].append(lb)
        ps = [
            Prompt(text=ds.structures[n].prompt, points=tuple(clicks[t]), labels=tuple(labels[t]))
            for t, n in enumerate(names)
        ]
        res = predictor.predict(ps, return_logits=True)
        preds = [r.logits > 0 for r in res]
        if k in counts:
            for t, n in enumerate(names):
                d, j = dice_iou(preds[t], targets[t])
                row = by_row[(case.id, n)]
                row.setdefault("dice_points", {})[str(k)] = d
                row.setdefault("iou_points", {})[str(k)] = j


def _centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else (0.0, 0.0)


def summarize(rows: list[dict[str, Any]], counts: tuple[int, ...] = CLICK_COUNTS) -> dict[str, Any]:
    """Aggregate rows into the JSON contract (per_prompt, overall, absent_fp_rate)."""
    per: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["present"]:
            groups[r["structure"]].append(r)
    for name, rs in sorted(groups.items()):
        entry: dict[str, Any] = {
            "prompt": rs[0]["prompt"],
            "n": len(rs),
            "dice": _mean([r["dice"] for r in rs]),
            "iou": _mean([r["iou"] for r in rs]),
            "area_fraction": _mean([r["area_fraction"] for r in rs]),
            "detected_rate": _mean([float(r["predicted_present"]) for r in rs]),
        }
        if any("dice_points" in r for r in rs):
            entry["dice_points"] = {
                str(k): _mean([r["dice_points"][str(k)] for r in rs if "dice_points" in r]) for k in counts
            }
            entry["iou_points"] = {
                str(k): _mean([r["iou_points"][str(k)] for r in rs if "iou_points" in r]) for k in counts
            }
        flagged = [r for r in rs if any((r.get("flags") or {}).values())]
        if flagged:
            clean = [r for r in rs if not any((r.get("flags") or {}).values())]
            entry["dice_unflagged"] = _mean([r["dice"] for r in clean])
            entry["dice_flagged"] = _mean([r["dice"] for r in flagged])
            entry["n_flagged"] = len(flagged)
        per[name] = entry
    present = [r for r in rows if r["present"]]
    absent = [r for r in rows if not r["present"]]
    overall: dict[str, Any] = {
        "n": len(present),
        "dice": _mean([r["dice"] for r in present]),
        "iou": _mean([r["iou"] for r in present]),
        "mean_structure_dice": _mean([v["dice"] for v in per.values()]),
    }
    big = {n: v for n, v in per.items() if (v["area_fraction"] or 0) > 0.01}
    overall["mean_structure_dice_area_gt_1pct"] = _mean([v["dice"] for v in big.values()])
    overall["n_structures_area_gt_1pct"] = len(big)
    if any("dice_points" in r for r in present):
        overall["dice_points"] = {
            str(k): _mean([r["dice_points"][str(k)] for r in present if "dice_points" in r]) for k in counts
        }
    fp = [float(r["false_positive"]) for r in absent]
    return {
        "per_prompt": per,
        "overall": overall,
        "absent_fp_rate": _mean(fp),
        "n_absent": len(absent),
    }


# -- outputs ---------------------------------------------------------------------------------------------
def print_table(summary: dict[str, Any], title: str = "evaluation") -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t = Table(title=title)
    for col in ("structure", "prompt", "n", "area", "Dice", "IoU", "Dice@1", "Dice@3", "Dice@8"):
        t.add_column(col, justify="right" if col not in ("structure", "prompt") else "left")
    for name, v in summary["per_prompt"].items():
        dp = v.get("dice_points", {})
        t.add_row(
            name,
            v["prompt"],
            str(v["n"]),
            f(v["area_fraction"]),
            f(v["dice"]),
            f(v["iou"]),
            f(dp.get("1")),
            f(dp.get("3")),
            f(dp.get("8")),
        )
    o = summary["overall"]
    dp = o.get("dice_points", {})
    t.add_row(
        "[b]overall[/b]",
        "",
        str(o["n"]),
        "",
        f(o["dice"]),
        f(o["iou"]),
        f(dp.get("1")),
        f(dp.get("3")),
        f(dp.get("8")),
    )
    con = Console()
    con.print(t)
    con.print(
        f"mean structure Dice {f(o['mean_structure_dice'])}; over structures > 1% of the image "
        f"({o['n_structures_area_gt_1pct']}): {f(o['mean_structure_dice_area_gt_1pct'])}; "
        f"absent-prompt FP rate {f(summary['absent_fp_rate'])} over {summary['n_absent']} absent prompts"
    )


def print_paraphrase(para: dict[str, Any]) -> None:
    """Per-structure canonical vs held-out-phrasing Dice, the overall drop and the worst phrasings."""
    from rich.console import Console
    from rich.table import Table

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t = Table(
        title=f"held-out phrasings (overall drop over structures with canonical Dice >= {para['floor']})"
    )
    for col in ("structure", "n", "canonical", "paraphrases", "drop", "worst phrasing"):
        t.add_column(col, justify="left" if col in ("structure", "worst phrasing") else "right")
    for name, v in para["per_structure"].items():
        mark = "" if v["above_floor"] else " *"
        t.add_row(
            name + mark,
            str(v["n"]),
            f(v["dice_canonical"]),
            f(v["dice_paraphrase"]),
            f(v["relative_drop"]),
            v["worst_phrasing"] or "-",
        )
    o = para["overall"]
    con = Console()
    con.print(t)
    con.print(
        f"paraphrase relative Dice drop {f(o['relative_drop'])} over {o['n_structures']} structures "
        f"(max {f(o['max_relative_drop'])}; {o['n_structures_below_floor']} below the floor, marked *)"
    )


def save_montage(
    predictor, ds: XrayDataset, rows: list[dict[str, Any]], path: Path, n: int = 4
) -> Path | None:
    """Worst and best text-only cases side by side: green = truth outline, red = prediction."""
    import cv2

    present = sorted((r for r in rows if r["present"]), key=lambda r: r["dice"])
    if not present:
        return None
    picks = present[:n] + present[-n:][::-1] if len(present) > n else present
    index = {ds.case_id(i): i for i in range(len(ds))}
    tiles = []
    for r in picks:
        case = ds.load(index[r["case"]], [r["structure"]])
        predictor.set_image(case.image)
        res = predictor.predict([r["prompt"]])[0]
        img = case.image.astype(np.float32)
        img = (255 * (img - img.min()) / max(1e-6, float(img.max() - img.min()))).astype(np.uint8)
        rgb = cv2.cvtColor(img if img.ndim == 2 else img[..., 0], cv2.COLOR_GRAY2BGR)
        over = rgb.copy()
        over[res.mask] = (0.5 * over[res.mask] + np.array([0, 0, 127])).astype(np.uint8)
        cnts, _ = cv2.findContours(
            case.masks[r["structure"]].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(over, cnts, -1, (0, 255, 0), max(1, over.shape[0] // 256))
        tile = cv2.resize(over, (256, int(256 * over.shape[0] / over.shape[1])))
        tile = cv2.copyMakeBorder(tile, 22, 0, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        tile = cv2.resize(tile, (256, 278))
        cv2.putText(
            tile,
            f"{r['prompt'][:22]} D={r['dice']:.2f}",
            (3, 15),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        tiles.append(tile)
    while len(tiles) % n:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.vstack([np.hstack(tiles[i : i + n]) for i in range(0, len(tiles), n)])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), grid)
    return path


def save_reliability(rows: list[dict[str, Any]], path: Path, threshold: float | None = None) -> Path | None:
    """Predicted IoU (score) against actual IoU for present prompts; absent prompts at actual 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pres = [r for r in rows if r["present"]]
    absn = [r for r in rows if not r["present"]]
    if not pres and not absn:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    if pres:
        ax.scatter(
            [r["score"] for r in pres], [r["actual_iou_best"] for r in pres], s=6, alpha=0.5, label="present"
        )
        bins = np.linspace(
            min(0.0, min(r["score"] for r in pres)), max(1.0, max(r["score"] for r in pres)), 11
        )
        sc = np.array([r["score"] for r in pres])
        ac = np.array([r["actual_iou_best"] for r in pres])
        centers, means = [], []
        for lo, hi in itertools.pairwise(bins):
            m = (sc >= lo) & (sc < hi)
            if m.sum() >= 3:
                centers.append(sc[m].mean())
                means.append(ac[m].mean())
        ax.plot(centers, means, "o-", color="k", label="binned mean")
    if absn:
        ax.scatter(
            [r["score"] for r in absn],
            [0.0] * len(absn),
            s=6,
            alpha=0.3,
            color="r",
            marker="x",
            label="absent",
        )
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="gray", ls="--", label=f"presence threshold {threshold:.2f}")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set_xlabel("predicted IoU (score)")
    ax.set_ylabel("actual IoU")
    ax.set_title("reliability")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- calibration and entry points ------------------------------------------------------------------------
def calibrate(predictor, ds: XrayDataset, opt: EvalOptions, max_fpr: float = 0.05) -> float:
    """Presence threshold from present vs absent prompt scores on a synthetic validation split."""
    from fluorosam_rt.predictor import calibrate_presence_threshold

    saved = predictor.presence_threshold
    predictor.presence_threshold = -math.inf
    o = EvalOptions(
        clicks=(),
        min_area_fraction=opt.min_area_fraction,
        max_cases=opt.max_cases,
        cases=opt.cases,
        case_sample=opt.case_sample,
        max_absent=opt.max_absent,
    )
    rows = run_cases(predictor, ds, o, progress=False)
    predictor.presence_threshold = saved
    pres = [r["score"] for r in rows if r["present"]]
    absn = [r["score"] for r in rows if not r["present"]]
    return calibrate_presence_threshold(pres, absn, max_fpr)


def make_predictor(checkpoint: str | None, device: str = "cpu", engine: str = "torch"):
    """The bundle's predictor (with its shipped prompt cache) on the engine create_engine picks."""
    from engines.select import EngineSettings, create_engine
    from fluorosam_rt.bundle import load_bundle

    b = load_bundle(checkpoint)
    settings = EngineSettings(engine, strict=True, device=device)
    return b.predictor(create_engine(settings, b.model), device=device), b


def evaluate(
    checkpoint: str | None,
    data: str,
    out_json: str | None = None,
    prompts: str | None = None,
    split: str = "val",
    opt: EvalOptions | None = None,
    out_dir: str | None = None,
    progress: bool = True,
    table: bool = True,
) -> dict[str, Any]:
    opt = opt or EvalOptions()
    predictor, bundle = make_predictor(checkpoint)
    from train.fluoroseg import FluoroSegDataset, is_fluoroseg

    if is_fluoroseg(data):
        ds: XrayDataset = FluoroSegDataset(data, split)
        if prompts:
            ds.override_prompts(json.loads(Path(prompts).read_text(encoding="utf-8")))
    else:
        ds = open_dataset(data, prompts)
    para_rows: list[dict[str, Any]] = []
    rows = run_cases(predictor, ds, opt, progress=progress, paraphrase_rows=para_rows)
    summary = summarize(rows, opt.clicks)
    result = {
        "checkpoint": bundle.source,
        "model": bundle.name,
        "data": str(data),
        "split": split if is_fluoroseg(data) else None,
        "presence_threshold": predictor.presence_threshold,
        "options": {
            "max_cases": opt.max_cases,
            "case_sample": opt.case_sample,
            "cases": opt.cases,
            "max_absent": opt.max_absent,
            "assume_absent": list(opt.assume_absent),
            "min_area_fraction": opt.min_area_fraction,
            "phrasings": opt.phrasings,
        },
        **summary,
    }
    if opt.phrasings == "heldout":
        from train.paraphrase_eval import summarize_paraphrase

        result["paraphrase"] = summarize_paraphrase(para_rows, opt.paraphrase_floor, opt.max_phrasings)
        result["paraphrase_cases"] = para_rows
    result["cases"] = rows
    if table:
        print_table(summary, title=f"{bundle.name} on {data}")
        if "paraphrase" in result:
            print_paraphrase(result["paraphrase"])
    out = Path(out_dir) if out_dir else (Path(out_json).parent if out_json else None)
    if out is not None:
        stem = Path(out_json).stem if out_json else "eval"
        m = save_montage(predictor, ds, rows, out / f"{stem}_montage.png")
        r = save_reliability(rows, out / f"{stem}_reliability.png", predictor.presence_threshold)
        result["montage"] = str(m) if m else None
        result["reliability_plot"] = str(r) if r else None
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def run_eval(args: argparse.Namespace) -> int:
    clicks = tuple(int(c) for c in args.clicks.split(",") if c.strip())

    def names(text: str) -> tuple[str, ...]:
        return tuple(s.strip() for s in text.split(",") if s.strip())

    opt = EvalOptions(
        clicks=clicks,
        min_area_fraction=args.min_area,
        max_cases=args.max_cases,
        cases=args.cases,
        case_sample=args.case_sample,
        structures=names(args.structures),
        max_absent=args.max_absent,
        assume_absent=names(args.assume_absent),
        phrasings=args.phrasings,
        max_phrasings=args.max_phrasings,
        phrasing_structures=names(args.phrasing_structures),
        paraphrase_floor=args.paraphrase_floor,
    )
    from train.synth.vocabulary import UnknownStructureError, Vocabulary

    for n in opt.assume_absent:
        try:
            Vocabulary.load().get(n)
        except UnknownStructureError as e:
            raise SystemExit(f"--assume-absent: {e}") from None
    if args.calibrate:
        if not args.checkpoint:
            raise SystemExit("--calibrate needs --checkpoint (the file the threshold is written into)")
        t = calibrate_checkpoint(args.checkpoint, args.data, args.split, opt, args.max_fpr)
        print(f"presence threshold {t:.4f} written to {args.checkpoint}")
        if not args.json:
            return 0
    evaluate(
        args.checkpoint,
        args.data,
        args.json,
        args.prompts,
        args.split,
        opt,
        args.out_dir,
        progress=not args.no_progress,
    )
    return 0


def calibration_bodies(
    roots: Sequence[str | Path], split: str, only: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """Bodies whose views a FluoroSeg split holds, and those of them that are held out (case.json).

    ``only``: restrict to these ``<root name>/<case>`` keys (the cases a capped run uses). Cases
    written before per-case bodies were recorded (or by the toy writer) name none.
    """
    from train.fluoroseg import fluoroseg_roots

    bodies: set[str] = set()
    heldout: set[str] = set()
    for data in roots:
        for root in fluoroseg_roots(data):
            for sp in ("train", "val") if split == "all" else (split,):
                f = root / f"{sp}.txt"
                if not f.is_file():
                    continue
                for case in (ln.strip() for ln in f.read_text().splitlines() if ln.strip()):
                    if only is not None and f"{root.name}/{case}" not in only:
                        continue
                    info = json.loads((root / case / "case.json").read_text(encoding="utf-8"))
                    if info.get("body"):
                        bodies.add(str(info["body"]))
                        if info.get("heldout_body"):
                            heldout.add(str(info["body"]))
    return sorted(bodies), sorted(heldout)


def calibrate_checkpoint(
    checkpoint: str, data: str | Sequence[str], split: str, opt: EvalOptions, max_fpr: float = 0.05
) -> float:
    """Calibrate on FluoroSeg split(s) and rewrite the native checkpoint with the threshold in its meta.

    Several roots are pooled: a gate calibrated on C-arm views alone need not hold on radiographs.
    Views of a held-out body are refused: its absent-prompt false-positive rate is a test figure, and
    a threshold fitted on it would tune on the test set. The bodies covered are stored in the meta.
    """
    from fluorosam_rt.checkpoint import load_native, save_native
    from train.fluoroseg import FluoroSegDataset

    roots = [data] if isinstance(data, str) else list(data)
    _, heldout = calibration_bodies(roots, split)
    if heldout:
        raise SystemExit(
            f"calibration data holds views of held-out bodies ({', '.join(heldout)}); "
            "calibrate on training bodies only (e.g. the eval suite's calib set)"
        )
    sets = [FluoroSegDataset(r, split) for r in roots]
    ds = sets[0] if len(sets) == 1 else ConcatXray(sets)
    used = {ds.case_id(i).rsplit("/", 1)[0] for i in _case_indices(ds, opt)}
    bodies, _ = calibration_bodies(roots, split, used)
    predictor, _ = make_predictor(checkpoint)
    t = calibrate(predictor, ds, opt, max_fpr)
    nm = load_native(checkpoint)
    meta = dict(nm.meta)
    meta["presence_threshold"] = float(t)
    meta["presence_calibration"] = {
        "data": [str(r) for r in roots],
        "split": split,
        "cases": opt.cases,
        "max_cases": opt.max_cases,
        "case_sample": opt.case_sample,
        "max_absent": opt.max_absent,
        "max_fpr": max_fpr,
        "bodies": bodies,
    }
    save_native(nm.model, checkpoint, nm.text_encoder, meta)
    return float(t)
