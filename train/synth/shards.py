"""Shards of one synth run: which shard this process is, and merging finished shards into one set.

Shard ``i`` of ``n`` renders the cases ``c`` with ``c % n == i`` of the run's global numbering, with every
draw seeded by ``[seed, case, ...]`` and the train/val split a function of the case index, so the merged
shards are the set one unsharded run writes (byte-identical images and annotations; only timings in
dataset.json differ). docs/synth_scale_out.md shows SLURM and torchrun launchers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from train.synth.atomic_dir import OutputError, staged

# Config keys that may differ between the shards of one set: they say where and how, not what.
PER_SHARD_KEYS = {"out", "workers", "shard", "device"}

LAUNCHER_VARS = (
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),  # sbatch --array=0-(n-1)
    ("RANK", "WORLD_SIZE"),  # torchrun, torch.distributed.launch, most MPI wrappers via these names
)


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n); ``"auto"`` reads the launcher's variables; None -> None (no sharding)."""
    if spec is None:
        return None
    env = os.environ if env is None else env
    if spec == "auto":
        for idx, count in LAUNCHER_VARS:
            if idx in env and count in env:
                i = int(env[idx]) - (
                    int(env.get("SLURM_ARRAY_TASK_MIN", "0")) if idx.startswith("SLURM") else 0
                )
                n = int(env[count])
                break
        else:
            names = " or ".join(f"{a}/{b}" for a, b in LAUNCHER_VARS)
            raise ValueError(f"--shard auto: none of {names} is set; pass --shard i/n")
    else:
        a, sep, b = spec.partition("/")
        try:
            i, n = int(a), int(b)
        except ValueError:
            i, n = -1, 0
        if not sep:
            i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: want i/n with 0 <= i < n (got i={i}, n={n})")
    return i, n


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (instant, no extra disk) when shards and the merged set share a file system, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _read_shard(d: Path) -> dict[str, Any]:
    f = d / "dataset.json"
    if not f.exists():
        raise OutputError(f"{d}: not a finished shard (no dataset.json)")
    doc = json.loads(f.read_text())
    if not doc.get("shard"):
        raise OutputError(f"{d}: dataset.json has no shard; it was not written with --shard")
    return doc


def merge_shards(out: str | Path, shard_dirs: list[str | Path], contact_sheet: int = 8) -> dict[str, Any]:
    """Merge every shard of one run into ``out`` (staged, renamed at the end); returns its dataset.json.

    Checks that the shards come from the same run (same config but where/how they ran), that each of the
    n shards is there exactly once, and that together they hold every case once.
    """
    from train.synth.contact_sheet import contact_sheets

    dirs = [Path(d) for d in shard_dirs]
    if not dirs:
        raise OutputError("synth-merge: no shard folders given")
    docs = [_read_shard(d) for d in dirs]
    ref = {k: v for k, v in docs[0]["config"].items() if k not in PER_SHARD_KEYS}
    n = docs[0]["shard"][1]
    for d, doc in zip(dirs, docs):
        cfg = {k: v for k, v in doc["config"].items() if k not in PER_SHARD_KEYS}
        if cfg != ref:
            diff = sorted(k for k in set(cfg) | set(ref) if cfg.get(k) != ref.get(k))
            raise OutputError(f"{d}: from another run than {dirs[0]} (config differs in {', '.join(diff)})")
        if doc["shard"][1] != n:
            raise OutputError(f"{d}: shard of {doc['shard'][1]}, but {dirs[0]} is a shard of {n}")
    seen: dict[int, Path] = {}
    for d, doc in zip(dirs, docs):
        i = doc["shard"][0]
        if i in seen:
            raise OutputError(f"{d}: shard {i}/{n} given twice (also {seen[i]})")
        seen[i] = d
    missing = sorted(set(range(n)) - set(seen))
    if missing:
        raise OutputError(f"synth-merge: shards {', '.join(map(str, missing[:10]))} of {n} are missing")
    cats = (dirs[0] / "categories.json").read_bytes()
    for d in dirs[1:]:
        if (d / "categories.json").read_bytes() != cats:
            raise OutputError(f"{d}: categories.json differs from {dirs[0]}'s")
    n_total = docs[0]["n_cases_total"]
    with staged(out) as tmp:
        splits: dict[str, list[str]] = {"train": [], "val": []}
        n_cases = 0
        for d in dirs:
            for split in splits:
                names = [ln.strip() for ln in (d / f"{split}.txt").read_text().splitlines() if ln.strip()]
                for name in names:
                    if (tmp / name).exists():
                        raise OutputError(f"{d}: case {name} is in two shards")
                    shutil.copytree(d / name, tmp / name, copy_function=_link_or_copy)
                splits[split] += names
                n_cases += len(names)
        if n_cases != n_total:
            raise OutputError(f"synth-merge: the shards hold {n_cases} cases, the run has {n_total}")
        for split, names in splits.items():
            (tmp / f"{split}.txt").write_text("".join(f"{c}\n" for c in sorted(names)))
        (tmp / "categories.json").write_bytes(cats)
        regions: dict[str, int] = {}
        per_body: dict[str, int] = {}
        for doc in docs:
            for k, v in doc["images_per_region"].items():
                regions[k] = regions.get(k, 0) + v
            for k, v in doc["cases_per_body"].items():
                per_body[k] = per_body.get(k, 0) + v
        if contact_sheet > 0:
            contact_sheets(tmp, contact_sheet, sorted(regions))
        summary = {
            "config": {**docs[0]["config"], "out": str(out), "shard": None},
            "n_images": sum(doc["n_images"] for doc in docs),
            "n_cases": n_cases,
            "n_cases_total": n_total,
            "shard": None,
            "merged_from": [str(d) for d in dirs],
            "bodies": docs[0]["bodies"],
            "cases_per_body": dict(sorted(per_body.items())),
            "images_per_region": dict(sorted(regions.items())),
            "seconds_render_per_shard": [doc["seconds_render"] for doc in docs],
            "worker_peak_rss_mb": max(doc["worker_peak_rss_mb"] for doc in docs),
            "torch": docs[0]["torch"],
        }
        (tmp / "dataset.json").write_text(json.dumps(summary, indent=1))
    return summary
