"""Dataset generation: bodies per case, regions and views per image, parallel workers, shards, progress bar.

Determinism: every draw comes from ``numpy.random.default_rng`` seeded by ``[seed, case, ...]`` (the body of
a case, its variation, each image's region and view, each region's tools) plus a torch generator seeded
from the image's stream, so views, masks and noise depend on neither the number of workers, nor the order
jobs run in, nor the shard a case falls in (pixel values only up to float rounding, which follows the
threads per worker). Jobs are ordered by body so a worker reuses the bodies it holds; the order never
changes what is drawn.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.synth.annotate import build_annotations
from train.synth.atomic_dir import staged
from train.synth.backend import make_backend
from train.synth.body_choice import BodyRef, load_file_body, pick_bodies, resolve_bodies
from train.synth.body_pool import PREPARE_SEED, BodyPool, load_or_prepare, prepared_cache_path, save_atomic
from train.synth.ct_source import CTInputError
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
from train.synth.regions import REGIONS, regions_of
from train.synth.tool_sampling import sample_tools
from train.synth.variation import apply_variation, sample_variation
from train.synth.views import sample_view
from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume

# Third seed words of the per-case streams (images use 0..images_per_case-1, user meshes 1_000_000 + k,
# the body draw body_choice.BODY_STREAM = 2_000_000).
VARIATION_STREAM = 3_000_000
TOOL_STREAM = 4_000_000  # + the region's index in REGIONS: one tool scenario per region of a case
REGION_INDEX = {name: k for k, name in enumerate(REGIONS)}


@dataclass
class SynthConfig:
    """Everything that defines a generated data set (stored as root/dataset.json)."""

    # Bodies: registered names, body folders, NIfTI CTs with their labels next to them, or "bundled".
    bodies: list[str] = field(default_factory=lambda: ["bundled"])
    body_set: str = ""  # "all": every built training body; "heldout": the held-out ones
    labels: str | None = None  # label map of the one file body, when not next to its CT
    regions: list[str] = field(default_factory=list)  # empty = every region each body has
    body_weights: dict[str, float] = field(default_factory=dict)  # name -> weight (default 1 each)
    variation: float = 1.0  # strength of the per-case anatomical variation (0: the body as it is)
    shard: list[int] | None = None  # [i, n]: render only the cases c with c % n == i
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
    max_bodies_per_worker: int = 2  # prepared bodies a worker keeps in memory (least recently used out)


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
        stl_meshes: list[np.ndarray] | None = None,
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
        self.stl_meshes = stl_meshes if stl_meshes is not None else [read_stl(s.path) for s in self.stl_specs]
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


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker process needs to render any case of the run (picklable)."""

    refs: tuple[BodyRef, ...]
    out: str
    seed: int
    size: int
    keep: tuple[int, ...] | None
    device: str
    threads: int
    backend: str = "torch"
    stl: tuple[str, ...] = ()
    stl_max_angle_deg: float = 180.0
    min_path_mm: tuple[tuple[str, float], ...] = ()
    density_spacing_mm: float = 2.0
    label_spacing_mm: float = 1.5
    p_no_tools: float = 0.3
    p_radiograph: float = 0.0
    variation: float = 1.0
    max_bodies: int = 2


class Worker:
    """One process's renderers: a body is loaded when a case first needs it; at most ``max_bodies`` kept."""

    def __init__(self, s: WorkerSettings, resolved: tuple[Vocabulary, list[STLSpec]] | None = None):
        if s.device == "cpu":
            torch.set_num_threads(s.threads)
        self.s = s
        self.vocab, self.specs = resolved or resolve_user_tools(Vocabulary.load(), list(s.stl))
        self.meshes = [read_stl(p.path) for p in self.specs]
        self.keep_ids = set(s.keep) if s.keep is not None else None
        self.pool: BodyPool[PreparedVolume] = BodyPool(s.max_bodies)
        self._current: tuple[str, Renderer] | None = None

    def renderer(self, vol: PreparedVolume) -> Renderer:
        s = self.s
        mp_mm = dict(s.min_path_mm)
        return Renderer(
            vol,
            self.vocab,
            self.keep_ids,
            s.device,
            s.backend,
            self.specs,
            s.stl_max_angle_deg,
            mp_mm,
            self.meshes,
        )

    def _load(self, ref: BodyRef) -> PreparedVolume:
        if not ref.lazy:
            return PreparedVolume.load(ref.prepared)  # prepared by the main process when it read the file
        s = self.s
        read = lambda: load_file_body(ref.source, None, self.vocab, ref.name)  # noqa: E731
        return load_or_prepare(Path(ref.prepared), read, s.density_spacing_mm, s.label_spacing_mm)

    def body(self, ref: BodyRef) -> tuple[Renderer, tuple[str, ...]]:
        """The renderer of the body as built, and the regions of ``ref`` its labels really have (a
        structures.csv may name a structure the label map lacks).

        The pool keeps up to ``max_bodies`` prepared volumes; only the current body has a renderer, whose
        projector holds per-axis copies of the volume (slice stacks), so memory stays bounded by a few
        volumes of the largest bodies however many the run has.
        """
        vol = self.pool.get(ref.name, lambda: self._load(ref))
        if self._current is None or self._current[0] != ref.name:
            self._current = None  # drop the previous body's slice stacks before building new ones
            self._current = (ref.name, self.renderer(vol))
        r = self._current[1]
        names = {self.vocab.by_id[i].name for i in vol.present_ids if i in self.vocab.by_id}
        have = set(regions_of(names))
        regions = tuple(g for g in ref.regions if g in have)
        if ref.regions and not regions:
            raise CTInputError(
                f"body {ref.name!r} ({ref.source}): its label map has none of the regions "
                f"{', '.join(ref.regions)}"
            )
        return r, regions

    def render_case(self, case: int, n_images: int, body_index: int) -> dict[str, Any]:
        """Render and write one case (a body, one anatomical variation, several views); returns a summary."""
        s = self.s
        ref = s.refs[body_index]
        t0 = time.perf_counter()
        loads = self.pool.loads
        r, regions_here = self.body(ref)
        variation = None
        if s.variation > 0:  # one patient from the body: its own renderer over the varied volume
            params = sample_variation(
                np.random.default_rng([s.seed, case, VARIATION_STREAM]), r.vol, s.variation
            )
            r = self.renderer(apply_variation(r.vol, params))
            variation = params.to_json()
        user_tools = r.user_tools(s.seed, case)
        case_tools: list[dict[str, Any]] = [{**t.to_json(), "region": None} for t in user_tools]
        region_tools: dict[str | None, tuple[list[RayTool], list[int]]] = {}
        case_dir = Path(s.out) / case_name(case)
        case_dir.mkdir(parents=True, exist_ok=True)
        images = []
        regions: Counter[str] = Counter()
        for j in range(n_images):
            irng = np.random.default_rng([s.seed, case, j])
            region = regions_here[int(irng.integers(len(regions_here)))] if regions_here else None
            if s.p_radiograph > 0 and "chest" in regions_here and irng.random() < s.p_radiograph:
                region = "chest"  # the whole-chest radiograph of --p-radiograph (its tools: the chest's)
                cam = sample_radiograph_camera(irng, r.chest_center, size=s.size)
                phys = sample_radiograph_physics(irng, s.size)
                view = cam.view
            elif region is None:  # a body with no known region: C-arm shots aimed at any organ
                cam = sample_camera(irng, r.anchors, size=s.size)
                phys = sample_physics(irng, s.size)
                view = cam.view
            else:
                cam, phys, view = sample_view(irng, r.vol, self.vocab, region, s.size)
            if region not in region_tools:
                trng = np.random.default_rng(
                    [s.seed, case, TOOL_STREAM + REGION_INDEX.get(region, len(REGIONS))]
                )
                tools = sample_tools(trng, r.vol, p_none=s.p_no_tools, region=region)
                first = len(case_tools)
                case_tools += [{**t.to_json(), "region": region} for t in tools]
                region_tools[region] = (tools, list(range(first, len(case_tools))))
            tools, tool_idx = region_tools[region]
            gen = torch.Generator(device=r.projector.device).manual_seed(int(irng.integers(2**62)))
            image_id = case * 100000 + j
            img, ann, _ = r.render(cam, [*tools, *user_tools], phys, image_id, gen)
            stem = f"{j:06d}"
            info = {
                "id": image_id,
                "file_name": f"{stem}.tiff",
                "height": s.size,
                "width": s.size,
                "region": region,
                "view": view,
                "tools": [*range(len(user_tools)), *tool_idx],
                "camera": cam.to_json(),
                "physics": phys.to_json(),
            }
            record = {
                "image": info,
                "annotations": ann["annotations"],
                "absent_category_ids": ann["absent_category_ids"],
                "dropped_category_ids": ann["dropped_category_ids"],
            }
            write_image(case_dir, stem, img, record)
            images.append(info)
            regions[region or "all"] += 1
        write_case(
            case_dir,
            {
                "case": case_name(case),
                "body": ref.name,
                "ct": ref.name,
                "heldout_body": ref.heldout,
                "variation": variation,
                "ct_present_category_ids": r.vol.present_ids,
                "tools": case_tools,
                "images": images,
            },
        )
        return {
            "case": case_name(case),
            "n": n_images,
            "seconds": time.perf_counter() - t0,
            "regions": dict(regions),
            "body_loaded": self.pool.loads > loads,
            "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "pid": os.getpid(),
        }


_WORKER: dict[str, Worker] = {}


def _init_worker(settings: WorkerSettings, resolved: tuple[Vocabulary, list[STLSpec]] | None = None) -> None:
    _WORKER["w"] = Worker(settings, resolved)


def _run_job(job: tuple[int, int, int]) -> dict[str, Any]:
    return _WORKER["w"].render_case(*job)


def steady_rate(results: list[dict[str, Any]]) -> float | None:
    """Images/s once started: each worker's rate without its first case (process start-up, first body
    load, first spectra), summed over the workers that ran in parallel; None without a second case."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for r in results:  # in completion order, so each worker's first result is its first case
        by_pid.setdefault(r["pid"], []).append(r)
    rates = [
        sum(r["n"] for r in rs[1:]) / sum(r["seconds"] for r in rs[1:])
        for rs in by_pid.values()
        if len(rs) > 1
    ]
    return round(sum(rates), 3) if rates else None


def usable_cpus() -> int:
    """CPUs this process may run on (a SLURM or container allocation), not all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def case_name(i: int) -> str:
    return f"case_{i:05d}"


def n_val_cases(n_cases: int, val_fraction: float) -> int:
    """How many of the last cases are validation: round(n * fraction), at least 1 when asked for any."""
    n_val = round(n_cases * val_fraction)
    if val_fraction > 0 and n_val == 0 and n_cases > 1:
        n_val = 1
    return min(max(n_val, 0), n_cases)


def is_val(case: int, n_cases: int, val_fraction: float) -> bool:
    """Split of a case from its index and the run's size only, so every shard agrees."""
    return case >= n_cases - n_val_cases(n_cases, val_fraction)


def images_of(case: int, cfg: SynthConfig) -> int:
    return min(cfg.images_per_case, cfg.n - case * cfg.images_per_case)


def shard_dir(out: str | Path, shard: list[int] | tuple[int, int] | None) -> Path:
    """Where a run writes: ``out`` itself, or ``out/shard-IIIII-of-NNNNN`` for shard i of n."""
    if not shard:
        return Path(out)
    i, n = shard
    return Path(out) / f"shard-{i:05d}-of-{n:05d}"


def _check_config(cfg: SynthConfig, vocab: Vocabulary) -> list[int] | None:
    keep: list[int] | None = None
    if cfg.structures:
        ids: set[int] = set()
        for name in cfg.structures:
            ids |= set(vocab.leaf_ids(name))  # raises on unknown names
        keep = sorted(ids)
    for name, mm in cfg.min_path_mm.items():
        vocab.leaf_ids(name)  # raises on unknown names, before any CT is read
        if not mm > 0:
            raise ValueError(f"min_path_mm[{name!r}] must be > 0 mm, got {mm}")
    if cfg.shard is not None:
        i, n = cfg.shard
        if not 0 <= i < n:
            raise ValueError(f"shard {i}/{n}: want 0 <= i < n")
    return keep


def _prepare_file_bodies(cfg: SynthConfig, vocab: Vocabulary, cache: Path):
    """``load_file`` for resolve_bodies: read a file body once, prepare it and cache it for the workers."""

    def load_file(value: str, labels: str | None, name: str):
        ct = load_file_body(value, labels, vocab, name)
        from train.synth.volume import prepare_volume

        vol = prepare_volume(ct, cfg.density_spacing_mm, cfg.label_spacing_mm, seed=PREPARE_SEED)
        save_atomic(vol, cache / f"{name}.npz")
        return ct

    return load_file


def run_bodies(cfg: SynthConfig, vocab: Vocabulary, cache: Path) -> list[BodyRef]:
    """The run's bodies, checked, each with the prepared-volume file its workers load (single CT files are
    read and prepared into ``cache`` now; body folders are prepared by the first worker that needs them)."""
    refs = resolve_bodies(
        cfg.bodies,
        cfg.body_set,
        cfg.labels,
        vocab,
        cfg.regions,
        cfg.body_weights,
        _prepare_file_bodies(cfg, vocab, cache),
    )
    mm = (cfg.density_spacing_mm, cfg.label_spacing_mm)
    return [
        replace(
            r,
            prepared=str(
                prepared_cache_path(Path(r.source), r.name, *mm) if r.lazy else cache / f"{r.name}.npz"
            ),
        )
        for r in refs
    ]


def prepare_bodies(cfg: SynthConfig) -> list[dict[str, Any]]:
    """Prepare every body folder of ``cfg`` into the shared cache (``synth --prepare-only``), e.g. once
    before a job array starts; returns per body its name, cache file and the seconds it took."""
    import tempfile

    vocab = Vocabulary.load()
    out = []
    with tempfile.TemporaryDirectory(prefix="synth-prepare-") as tmp:
        for ref in run_bodies(cfg, vocab, Path(tmp)):
            if not ref.lazy:
                continue  # a single CT file is prepared by each run itself
            t0 = time.perf_counter()
            read = lambda ref=ref: load_file_body(ref.source, None, vocab, ref.name)  # noqa: E731
            load_or_prepare(Path(ref.prepared), read, cfg.density_spacing_mm, cfg.label_spacing_mm)
            out.append(
                {"body": ref.name, "prepared": ref.prepared, "seconds": round(time.perf_counter() - t0, 2)}
            )
    return out


def generate(cfg: SynthConfig, progress: bool = True, contact_sheet: int = 8) -> dict[str, Any]:
    """Generate ``cfg.n`` images (or this shard's part) under ``cfg.out``; returns the dataset.json summary.

    Everything is written into a staging folder next to the destination and renamed into place at the
    end, contact sheets (``contact_sheet`` images per region, 0: none) included.
    """
    from tqdm import tqdm

    from train.synth.contact_sheet import contact_sheets

    t_start = time.perf_counter()
    vocab, specs = resolve_user_tools(Vocabulary.load(), cfg.tool_stl)
    keep = _check_config(cfg, vocab)
    n_cases = max(1, -(-cfg.n // cfg.images_per_case))
    i_sh, n_sh = cfg.shard or (0, 1)
    cases = list(range(i_sh, n_cases, n_sh))
    final = shard_dir(cfg.out, cfg.shard)
    with staged(final) as tmp:
        cache = tmp / ".cache"
        refs = run_bodies(cfg, vocab, cache)
        t_prep = time.perf_counter() - t_start
        body_of = pick_bodies(cfg.seed, cases, refs)
        jobs = sorted(((c, images_of(c, cfg), body_of[c]) for c in cases), key=lambda j: (j[2], j[0]))
        workers = max(1, min(cfg.workers, len(jobs)))
        threads = max(1, usable_cpus() // workers) if cfg.device == "cpu" else 1
        settings = WorkerSettings(
            refs=tuple(refs),
            out=str(tmp),
            seed=cfg.seed,
            size=cfg.size,
            keep=tuple(keep) if keep is not None else None,
            device=cfg.device,
            threads=threads,
            backend=cfg.backend,
            stl=tuple(cfg.tool_stl),
            stl_max_angle_deg=cfg.stl_max_angle_deg,
            min_path_mm=tuple(cfg.min_path_mm.items()),
            density_spacing_mm=cfg.density_spacing_mm,
            label_spacing_mm=cfg.label_spacing_mm,
            p_no_tools=cfg.p_no_tools,
            p_radiograph=cfg.p_radiograph,
            variation=cfg.variation,
            max_bodies=cfg.max_bodies_per_worker,
        )
        n_images = sum(j[1] for j in jobs)
        bar = tqdm(total=n_images, unit="img", disable=not progress, desc="synth")
        results = []
        t_render = time.perf_counter()
        try:
            if workers == 1:
                _init_worker(settings, (vocab, specs))  # in this process: the vocabulary is read already
                for job in jobs:
                    results.append(_run_job(job))
                    bar.update(job[1])
            else:
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
                    for res in pool.imap_unordered(_run_job, jobs):
                        results.append(res)
                        bar.update(res["n"])
        finally:
            _WORKER.clear()
            bar.close()
        t_render = time.perf_counter() - t_render
        val = [case_name(c) for c in cases if is_val(c, n_cases, cfg.val_fraction)]
        train = [case_name(c) for c in cases if not is_val(c, n_cases, cfg.val_fraction)]
        write_splits(tmp, train, val)
        with open(tmp / "categories.json", "w") as f:
            json.dump(vocab.coco_categories(), f, indent=1)
        regions: Counter[str] = Counter()
        for res in results:
            regions.update(res["regions"])
        shutil.rmtree(cache, ignore_errors=True)
        if contact_sheet > 0 and n_images:
            contact_sheets(tmp, contact_sheet, sorted(regions))
        total = time.perf_counter() - t_start
        summary = {
            "config": asdict(cfg),
            "n_images": n_images,
            "n_cases": len(cases),
            "n_cases_total": n_cases,
            "shard": list(cfg.shard) if cfg.shard else None,
            "bodies": [r.to_json() for r in refs],
            "cases_per_body": dict(Counter(refs[body_of[c]].name for c in cases)),
            "images_per_region": dict(sorted(regions.items())),
            "seconds_total": round(total, 2),
            "seconds_prepare": round(t_prep, 2),
            "seconds_render": round(t_render, 2),
            "images_per_second": round(n_images / max(t_render, 1e-9), 3),
            "images_per_second_steady": steady_rate(results),
            "workers": workers,
            "body_loads": sum(r["body_loaded"] for r in results),  # bodies (re)loaded by the workers
            "worker_peak_rss_mb": round(max((r["rss_peak_mb"] for r in results), default=0.0), 1),
            "torch": torch.__version__,
            "cpu_count": usable_cpus(),
        }
        with open(tmp / "dataset.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary
