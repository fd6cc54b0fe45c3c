"""Dataset generation: scenarios (tool sets) per case, views per image, parallel workers, progress bar.

Determinism: every case and image draws from ``numpy.random.default_rng([seed, case, image])`` and a torch
generator seeded the same way, so views, masks and noise do not depend on the number of workers or their
scheduling (pixel values only up to float rounding, which follows the threads per worker).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.synth.annotate import build_annotations
from train.synth.backend import make_backend
from train.synth.fluoroseg_io import write_case, write_image, write_splits
from train.synth.geometry import Camera, sample_camera, sample_radiograph_camera
from train.synth.mesh import STLSpec, make_mesh_tool, read_stl
from train.synth.physics import (
    PhysicsParams,
    collimator_mask,
    sample_physics,
    sample_radiograph_physics,
)
from train.synth.projector import RayTool
from train.synth.tools import sample_tools
from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume


@dataclass
class SynthConfig:
    """Everything that defines a generated data set (stored as root/dataset.json)."""

    ct: str = "bundled"
    labels: str | None = None
    n: int = 100
    size: int = 256
    out: str = "out/synth"
    workers: int = 1
    seed: int = 0
    images_per_case: int = 10
    val_fraction: float = 0.1
    structures: list[str] = field(default_factory=list)  # empty = all; names of structures or groups
    device: str = "cpu"
    density_spacing_mm: float = 2.0
    label_spacing_mm: float = 1.5
    p_no_tools: float = 0.3
    # Share of chest-radiograph views (whole thorax, long source distance, no round collimator) among
    # the C-arm ones; 0 draws nothing extra, so older data sets regenerate with the same views and masks.
    p_radiograph: float = 0.0
    # Structure/group name -> mm: its masks keep only pixels whose ray runs at least this far inside it
    # (e.g. {"lungs": 30}: the lung fields a reader sees, not every ray that grazes lung).
    # Empty: any crossing.
    min_path_mm: dict[str, float] = field(default_factory=dict)
    backend: str = "torch"  # "torch" (ours) or "deepdrr" (optional, CUDA)
    tool_stl: list[str] = field(default_factory=list)  # PATH[:material[:name]], placed in every case
    stl_max_angle_deg: float = 180.0  # user meshes turn at most this far from their file's orientation


def anchor_points(vol: PreparedVolume, margin_mm: float = 40.0) -> np.ndarray:
    """Organ centroids far enough inside the CT that views aimed at them are not mostly outside it."""
    shape = np.array(vol.materials.shape[2:]) - 1
    corners = np.array([[a, b, c, 1.0] for a in (0, shape[0]) for b in (0, shape[1]) for c in (0, shape[2])])
    w = (vol.materials_affine @ corners.T).T[:, :3]
    lo, hi = w.min(0) + margin_mm, w.max(0) - margin_mm
    pts = [c for c in vol.anchors.values() if np.all(c[2] >= lo[2]) and np.all(c[2] <= hi[2])]
    return np.stack(pts) if pts else np.stack(list(vol.anchors.values()))


def chest_center(vol: PreparedVolume, vocab: Vocabulary) -> np.ndarray:
    """Where a chest radiograph is aimed: the centroid of the lung lobes, or the CT's centre without them."""
    lung_ids = set(vocab.leaf_ids("lungs"))
    pts = [c for i, c in vol.anchors.items() if i in lung_ids]
    if pts:
        return np.mean(np.stack(pts), axis=0)
    shape = np.array(vol.materials.shape[2:], dtype=np.float64) - 1
    return (vol.materials_affine @ np.append(shape / 2, 1.0))[:3]


class Renderer:
    """One image end to end: projection, physics, annotations. Owned by a worker process."""

    def __init__(
        self,
        vol: PreparedVolume,
        vocab: Vocabulary,
        keep_ids: set[int] | None,
        device: str = "cpu",
        backend: str = "torch",
        stl_specs: list[STLSpec] | None = None,
        stl_max_angle_deg: float = 180.0,
        min_path_mm: dict[str, float] | None = None,
    ):
        self.vol = vol
        self.vocab = vocab
        self.backend = make_backend(backend, vol, device)
        self.projector = self.backend.projector
        self.min_path_mm = dict(min_path_mm or {})
        self.path_leaves = {n: vocab.leaf_ids(n) for n in self.min_path_mm}
        self.projector.set_path_groups(self.path_leaves)
        self.keep_ids = keep_ids
        self.anchors = anchor_points(vol)
        self.chest_center = chest_center(vol, vocab)
        self.stl_specs = list(stl_specs or [])
        self.stl_meshes = [read_stl(s.path) for s in self.stl_specs]
        self.stl_max_angle_deg = stl_max_angle_deg

    def user_tools(self, seed: int, case: int) -> list[RayTool]:
        """The user's meshes placed for one case, each from its own random stream.

        Separate streams leave the procedural tools and views of a seed unchanged when meshes are added.
        """
        out: list[RayTool] = []
        for k, (spec, tris) in enumerate(zip(self.stl_specs, self.stl_meshes)):
            rng = np.random.default_rng([seed, case, 1_000_000 + k])
            name = self.vocab.by_id[spec.category_id].name
            out.append(make_mesh_tool(rng, self.vol, spec, tris, name, self.stl_max_angle_deg))
        return out

    def render(
        self, cam: Camera, tools: list[RayTool], phys: PhysicsParams, image_id: int, gen: torch.Generator
    ) -> tuple[np.ndarray, dict[str, Any], Any]:
        img, proj = self.backend.render(cam, tools, phys, generator=gen)
        fov = collimator_mask(cam.height, cam.width, phys, img.device)
        leaves = {lid: proj.label_hits[i] for i, lid in enumerate(proj.label_ids)}
        for name, mm in self.min_path_mm.items():
            if name in proj.group_paths:
                deep = proj.group_paths[name] >= mm
                for lid in self.path_leaves[name]:
                    if lid in leaves:
                        leaves[lid] = leaves[lid] & deep
        for ti, tid in enumerate(proj.tool_ids):
            leaves[tid] = leaves[tid] | proj.tool_hits[ti] if tid in leaves else proj.tool_hits[ti]
        if self.keep_ids is not None:
            leaves = {k: v for k, v in leaves.items() if k in self.keep_ids}
        ann = build_annotations(self.vocab, leaves, image_id, fov=fov)
        return img.cpu().numpy(), ann.__dict__, proj


_WORKER: dict[str, Any] = {}


def resolve_user_tools(vocab: Vocabulary, specs: list[str]) -> tuple[Vocabulary, list[STLSpec]]:
    """Parse ``--tool-stl`` specs and give each its user-tool category (named after the user's name)."""
    default = vocab.by_name["custom_tool"].material or "stainless_steel"
    parsed = [STLSpec.parse(s, default) for s in specs]
    if not parsed:
        return vocab, []
    for p in parsed:
        read_stl(p.path)  # fail before any work is done, with the file's problem
    vocab, ids = vocab.with_user_tools([p.name for p in parsed], [p.material for p in parsed])
    return vocab, [STLSpec(p.path, p.material, p.name, cid) for p, cid in zip(parsed, ids)]


def _init_worker(
    vol_path: str,
    keep: list[int] | None,
    device: str,
    threads: int,
    backend: str = "torch",
    stl: list[str] | None = None,
    stl_max_angle_deg: float = 180.0,
    min_path_mm: dict[str, float] | None = None,
) -> None:
    torch.set_num_threads(threads)
    vol = PreparedVolume.load(vol_path)
    vocab, specs = resolve_user_tools(Vocabulary.load(), list(stl or []))
    keep_ids = set(keep) if keep is not None else None
    _WORKER["r"] = Renderer(vol, vocab, keep_ids, device, backend, specs, stl_max_angle_deg, min_path_mm)


def _case_name(i: int) -> str:
    return f"case_{i:05d}"


def render_case(
    case: int, n_images: int, seed: int, size: int, out: str, p_no_tools: float, p_radiograph: float = 0.0
) -> dict[str, Any]:
    """Render and write one case (a CT plus one tool scenario, several views); returns its summary."""
    r: Renderer = _WORKER["r"]
    rng = np.random.default_rng([seed, case])
    tools: list[RayTool] = [*sample_tools(rng, r.vol, p_none=p_no_tools), *r.user_tools(seed, case)]
    case_dir = Path(out) / _case_name(case)
    case_dir.mkdir(parents=True, exist_ok=True)
    images = []
    t0 = time.perf_counter()
    for j in range(n_images):
        irng = np.random.default_rng([seed, case, j])
        if p_radiograph > 0 and irng.random() < p_radiograph:
            cam = sample_radiograph_camera(irng, r.chest_center, size=size)
            phys = sample_radiograph_physics(irng, size)
        else:
            cam = sample_camera(irng, r.anchors, size=size)
            phys = sample_physics(irng, size)
        gen = torch.Generator(device=r.projector.device).manual_seed(int(irng.integers(2**62)))
        image_id = case * 100000 + j
        img, ann, _ = r.render(cam, tools, phys, image_id, gen)
        stem = f"{j:06d}"
        info = {
            "id": image_id,
            "file_name": f"{stem}.tiff",
            "height": size,
            "width": size,
            "camera": cam.to_json(),
            "physics": phys.to_json(),
        }
        write_image(
            case_dir,
            stem,
            img,
            {
                "image": info,
                "annotations": ann["annotations"],
                "absent_category_ids": ann["absent_category_ids"],
                "dropped_category_ids": ann["dropped_category_ids"],
            },
        )
        images.append(info)
    write_case(
        case_dir,
        {
            "case": _case_name(case),
            "ct": r.vol.name,
            "ct_present_category_ids": r.vol.present_ids,
            "tools": [t.to_json() for t in tools],
            "images": images,
        },
    )
    return {"case": _case_name(case), "n": n_images, "seconds": time.perf_counter() - t0}


def generate(cfg: SynthConfig, progress: bool = True) -> dict[str, Any]:
    """Generate ``cfg.n`` images under ``cfg.out``; returns the summary written to dataset.json."""
    from tqdm import tqdm

    from train.synth.ct_source import load_ct
    from train.synth.volume import prepare_volume

    t_start = time.perf_counter()
    vocab, _ = resolve_user_tools(Vocabulary.load(), cfg.tool_stl)
    keep: list[int] | None = None
    if cfg.structures:
        ids: set[int] = set()
        for name in cfg.structures:
            ids |= set(vocab.leaf_ids(name))  # raises on unknown names
        keep = sorted(ids)
    for name, mm in cfg.min_path_mm.items():
        vocab.leaf_ids(name)  # raises on unknown names, before the CT is read
        if not mm > 0:
            raise ValueError(f"min_path_mm[{name!r}] must be > 0 mm, got {mm}")
    ct = load_ct(cfg.ct, cfg.labels, vocabulary=vocab)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / ".cache"
    cache.mkdir(exist_ok=True)
    vol = prepare_volume(ct, cfg.density_spacing_mm, cfg.label_spacing_mm, seed=cfg.seed)
    vol_path = cache / "volume.npz"
    vol.save(vol_path)
    del ct, vol
    t_prep = time.perf_counter() - t_start

    n_cases = max(1, -(-cfg.n // cfg.images_per_case))
    jobs = [
        (
            c,
            min(cfg.images_per_case, cfg.n - c * cfg.images_per_case),
            cfg.seed,
            cfg.size,
            str(out),
            cfg.p_no_tools,
            cfg.p_radiograph,
        )
        for c in range(n_cases)
    ]
    workers = max(1, cfg.workers)
    threads = max(1, (os.cpu_count() or 1) // workers) if cfg.device == "cpu" else 1
    bar = tqdm(total=cfg.n, unit="img", disable=not progress, desc="synth")
    results = []
    init = (
        str(vol_path),
        keep,
        cfg.device,
        threads,
        cfg.backend,
        cfg.tool_stl,
        cfg.stl_max_angle_deg,
        cfg.min_path_mm,
    )
    if workers == 1:
        _init_worker(*init)
        for job in jobs:
            results.append(render_case(*job))
            bar.update(job[1])
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
            for res in pool.imap_unordered(_star, jobs):
                results.append(res)
                bar.update(res["n"])
    bar.close()
    n_val = round(n_cases * cfg.val_fraction) if n_cases > 1 else 0
    n_val = max(1, n_val) if n_cases > 1 and cfg.val_fraction > 0 else n_val
    names = [_case_name(c) for c in range(n_cases)]
    write_splits(out, names[: n_cases - n_val], names[n_cases - n_val :])
    with open(out / "categories.json", "w") as f:
        json.dump(vocab.coco_categories(), f, indent=1)
    total = time.perf_counter() - t_start
    summary = {
        "config": asdict(cfg),
        "n_images": cfg.n,
        "n_cases": n_cases,
        "seconds_total": round(total, 2),
        "seconds_prepare": round(t_prep, 2),
        "images_per_second": round(cfg.n / max(total - t_prep, 1e-9), 3),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    with open(out / "dataset.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _star(job: tuple) -> dict[str, Any]:
    return render_case(*job)
