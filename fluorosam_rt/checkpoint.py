"""Loading and saving model weights: the official FluoroSAM checkpoint and our native format.

Official files are Lightning checkpoints (``state_dict`` with keys ``sam.<key>``) or bare
state dicts. The official loader uses ``strict=False``, which silently keeps random values for
anything missing (even the positional-encoding matrix and the VQ codebook). We load strictly by
default and report every missing, unexpected and mis-shaped key; ``allow_partial`` is an
explicit opt-in.

The native format is a single ``.safetensors`` file (no pickle, so loading cannot execute
code) whose metadata holds the model config, the text-encoder identity and calibration values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .model.build import build_model
from .model.config import ImageEncoderConfig, ModelConfig, PromptEncoderConfig, SwinConfig, TextConfig
from .model.sam import FluoroSAM

NATIVE_FORMAT = "fluorosam-rt/1"
OFFICIAL_PREFIX = "sam."
TEXT_PREFIX = "prompt_encoder.text_model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    cast: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 12) -> str:
        def clip(items: list[Any]) -> str:
            shown = ", ".join(str(x) for x in items[:limit])
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            return shown + more

        lines = [f"checkpoint {self.source or '<state dict>'}: {len(self.loaded)} keys loaded"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {clip(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {clip(self.unexpected)}")
        if self.mismatched:
            mm = [f"{k} file{tuple(a)} vs model{tuple(b)}" for k, a, b in self.mismatched]
            lines.append(f"  mis-shaped ({len(self.mismatched)}): {clip(mm)}")
        if self.cast:
            dtypes = sorted({f"{a}->{b}" for _, a, b in self.cast})
            lines.append(f"  cast ({len(self.cast)} tensors): {', '.join(dtypes)}")
        if self.ignored:
            lines.append(f"  ignored, not model weights ({len(self.ignored)}): {clip(self.ignored)}")
        return "\n".join(lines)


def read_official_state_dict(
    path: str | Path, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a Lightning checkpoint or bare state dict; return model keys (prefix stripped).

    The second value lists keys that are not ``sam.`` model weights in a Lightning file.
    torch.load runs with weights_only=True unless the caller trusts the file: a pickle can run
    arbitrary code, and a checkpoint in an OR must not be able to.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        hint = (
            " The file holds Python objects beyond tensors; if you trust its origin, pass "
            "trust_pickle=True (CLI: --trust-pickle)."
            if "weights_only" in str(exc) or "Unsupported global" in str(exc)
            else ""
        )
        raise CheckpointError(f"cannot read checkpoint {p}: {type(exc).__name__}: {exc}.{hint}") from exc
    return split_official_state_dict(obj, str(p))


def split_official_state_dict(
    obj: Any, source: str = "<object>"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{source}: no state_dict found")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source}: the state dict holds no tensors")
    prefixed = [k for k in tensors if k.startswith(OFFICIAL_PREFIX)]
    if prefixed:
        model_sd = {k[len(OFFICIAL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OFFICIAL_PREFIX)}
        ignored = sorted(k for k in tensors if not k.startswith(OFFICIAL_PREFIX))
    else:
        model_sd, ignored = dict(tensors), []
    return model_sd, ignored


def infer_official_config(sd: dict[str, torch.Tensor], clip_heads: int | None = None) -> ModelConfig:
    """Derive Swin, VQ and CLIP sizes from tensor shapes, starting from the official config.

    CLIP's head count is not visible in any shape; OpenAI's rule width // 64 is used unless
    clip_heads is given (the reduced golden model needs 2 heads at width 64).
    """
    cfg = ModelConfig()
    swin_prefix = "image_encoder.backbone.swin."
    if swin_prefix + "patch_embed.projection.weight" in sd:
        w = sd[swin_prefix + "patch_embed.projection.weight"]
        depths, heads = [], []
        stage = 0
        while any(k.startswith(f"{swin_prefix}stages.{stage}.") for k in sd):
            blocks = {
                int(m.group(1))
                for k in sd
                if (m := re.match(rf"{re.escape(swin_prefix)}stages\.{stage}\.blocks\.(\d+)\.", k))
            }
            depths.append(len(blocks))
            table = sd[f"{swin_prefix}stages.{stage}.blocks.0.attn.w_msa.relative_position_bias_table"]
            heads.append(int(table.shape[1]))
            stage += 1
        window = round(math.sqrt(table.shape[0])) // 2 + 1
        cfg = replace(
            cfg,
            image_encoder=replace(
                cfg.image_encoder,
                swin=SwinConfig(
                    embed_dims=int(w.shape[0]),
                    depths=tuple(depths),
                    num_heads=tuple(heads),
                    window_size=window,
                    patch_size=int(w.shape[-1]),
                ),
            ),
        )
    if "prompt_encoder.vq._codebook.embed" in sd:
        n = int(sd["prompt_encoder.vq._codebook.embed"].shape[1])
        cfg = replace(cfg, prompt_encoder=replace(cfg.prompt_encoder, codebook_size=n))
    elif any(k.startswith("prompt_encoder.") for k in sd):
        cfg = replace(cfg, prompt_encoder=replace(cfg.prompt_encoder, use_vq=False))
    tok = sd.get(TEXT_PREFIX + "token_embedding.weight")
    if tok is not None:
        width = int(tok.shape[1])
        layers = len(
            {
                int(m.group(1))
                for k in sd
                if (m := re.match(rf"{re.escape(TEXT_PREFIX)}transformer\.resblocks\.(\d+)\.", k))
            }
        )
        text = replace(
            cfg.text,
            width=width,
            layers=layers,
            heads=clip_heads or max(1, width // 64),
            vocab_size=int(tok.shape[0]),
            context_length=int(sd[TEXT_PREFIX + "positional_embedding"].shape[0]),
            feature_dim=int(sd[TEXT_PREFIX + "text_projection"].shape[1]),
        )
        conv = sd.get(TEXT_PREFIX + "visual.conv1.weight")
        if conv is not None:
            n_pos = int(sd[TEXT_PREFIX + "visual.positional_embedding"].shape[0])
            patch = int(conv.shape[-1])
            text = replace(
                text,
                keep_visual_remnants=True,
                visual_width=int(conv.shape[0]),
                visual_patch_size=patch,
                visual_resolution=patch * round(math.sqrt(n_pos - 1)),
            )
        else:
            text = replace(text, keep_visual_remnants=False)
        cfg = replace(cfg, text=text)
    return cfg


def load_state_dict_checked(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], allow_partial: bool = False, source: str = ""
) -> LoadReport:
    """Load with a full report. Raises CheckpointError unless every key fits (or allow_partial).

    Tensors are cast to the model's dtype (official CLIP weights are often fp16). A scalar slot
    accepts a one-element tensor (older vector-quantize-pytorch stored ``initted`` as [1]).
    """
    report = LoadReport(source=source)
    target = model.state_dict()
    fixed: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key]
        if tuple(value.shape) != tuple(want.shape):
            if value.numel() == want.numel() == 1:
                value = value.reshape(want.shape)
            else:
                report.mismatched.append((key, tuple(value.shape), tuple(want.shape)))
                continue
        if value.dtype != want.dtype:
            report.cast.append(
                (key, str(value.dtype).replace("torch.", ""), str(want.dtype).replace("torch.", ""))
            )
            value = value.to(want.dtype)
        fixed[key] = value
        report.loaded.append(key)
    report.missing = [k for k in target if k not in fixed and k not in {m for m, _, _ in report.mismatched}]
    if not report.ok and not allow_partial:
        raise CheckpointError(
            "checkpoint does not fit the model (strict load):\n"
            + report.summary()
            + "\nPass allow_partial=True (CLI: --allow-partial) only if you accept the gaps."
        )
    model.load_state_dict(fixed, strict=False)
    return report


def load_official(
    path_or_sd: str | Path | dict[str, torch.Tensor],
    cfg: ModelConfig | None = None,
    clip_weights: str | Path | None = None,
    allow_partial: bool = False,
    trust_pickle: bool = False,
) -> tuple[FluoroSAM, LoadReport]:
    """Build the official architecture and load an official checkpoint into it.

    If the file lacks the CLIP text tower (``prompt_encoder.text_model.*``), pass a local
    OpenAI CLIP ViT-B/32 file as clip_weights; it is read from disk, never downloaded.
    """
    if isinstance(path_or_sd, dict):
        source = "<state dict>"
        sd, ignored = split_official_state_dict(path_or_sd, source)
    else:
        sd, ignored = read_official_state_dict(path_or_sd, trust_pickle=trust_pickle)
        source = str(path_or_sd)
    if cfg is None:
        cfg = infer_official_config(sd)
    has_text = any(k.startswith(TEXT_PREFIX) for k in sd)
    if not has_text and clip_weights is None and not allow_partial:
        raise CheckpointError(
            f"{source}: the checkpoint has no CLIP text tower (prompt_encoder.text_model.*); pass a local "
            "OpenAI CLIP ViT-B/32 file as clip_weights (CLI: --clip-weights PATH)"
        )
    if not has_text and clip_weights is not None:
        from .text.clip import load_clip_text_weights

        text_model = load_clip_text_weights(clip_weights, cfg.text)
        for k, v in text_model.state_dict().items():
            sd[TEXT_PREFIX + k] = v
    model = build_model(cfg)
    model.eval()
    report = load_state_dict_checked(model, sd, allow_partial=allow_partial, source=source)
    report.ignored = ignored
    return model, report


def save_native(
    model: FluoroSAM,
    path: str | Path,
    text_encoder: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write model weights and everything needed to rebuild it into one .safetensors file.

    text_encoder describes the external text encoder (kind, identity hash) so a mismatched
    encoder is detected at load time instead of producing silently wrong prompt tokens.
    """
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": NATIVE_FORMAT,
        "config": json.dumps(model.cfg.to_dict()),
        "text_encoder": json.dumps(text_encoder),
        "meta": json.dumps(meta or {}),
    }
    save_file(tensors, str(p), metadata=metadata)
    return p


@dataclass
class NativeModel:
    model: FluoroSAM
    text_encoder: dict[str, Any]
    meta: dict[str, Any]
    report: LoadReport


def load_native(path: str | Path, allow_partial: bool = False) -> NativeModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(p))
    except Exception as exc:
        raise CheckpointError(f"cannot read native checkpoint {p}: {type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != NATIVE_FORMAT:
        raise CheckpointError(
            f"{p} is not a fluorosam-rt native checkpoint (format={metadata.get('format')!r}); "
            "for an official FluoroSAM file use format 'official'"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(metadata["config"]))
        text_encoder = json.loads(metadata.get("text_encoder", "{}"))
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{p}: invalid metadata: {exc}") from exc
    model = build_model(cfg, with_text_model=any(k.startswith(TEXT_PREFIX) for k in tensors))
    model.eval()
    report = load_state_dict_checked(model, tensors, allow_partial=allow_partial, source=str(p))
    return NativeModel(model=model, text_encoder=text_encoder, meta=meta, report=report)


def detect_format(path: str | Path) -> str:
    """'native' for our safetensors files, 'official' for torch pickles."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    with p.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{p}: file is too small to be a checkpoint")
    header_len = int.from_bytes(head, "little")
    if 0 < header_len < 100_000_000 and p.suffix == ".safetensors":
        return "native"
    return "official"


__all__ = [
    "CheckpointError",
    "ImageEncoderConfig",
    "LoadReport",
    "NativeModel",
    "PromptEncoderConfig",
    "TextConfig",
    "detect_format",
    "infer_official_config",
    "load_native",
    "load_official",
    "load_state_dict_checked",
    "read_official_state_dict",
    "save_native",
]
