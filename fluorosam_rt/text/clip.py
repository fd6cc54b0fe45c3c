"""OpenAI CLIP text tower (the official FluoroSAM text encoder), key-for-key with the checkpoint.

Module and parameter names mirror OpenAI CLIP's ``model.CLIP`` relative to its root, so the
``prompt_encoder.text_model.*`` slice of the FluoroSAM checkpoint (or OpenAI's own ViT-B-32.pt)
loads with ``strict=True``. The feature is the ln_final row at the EOT token times
``text_projection``, with no normalisation, which is what FluoroSAM feeds its clip_mlp.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.config import TextConfig
from fluorosam_rt.text.base import TextEncoder
from fluorosam_rt.text.clip_tokenizer import ClipTokenizer

# Key prefixes under which a CLIP text tower is found, most specific first.
CHECKPOINT_PREFIXES = ("sam.prompt_encoder.text_model.", "prompt_encoder.text_model.", "")
# First components of the text tower's keys. Keys starting with anything else are not ours.
_TEXT_ROOTS = frozenset(
    {"token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "logit_scale"}
)
# Integer bookkeeping entries in OpenAI's TorchScript state dicts.
_OPENAI_META_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, as CLIP does, so fp16 weights stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation CLIP was trained with (not exact GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names ([q; k; v] in_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k_, l_, w_ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(k_, l_, 3, self.heads, w_ // self.heads).permute(2, 0, 3, 1, 4)
        # is_causal equals CLIP's additive -inf mask above the diagonal; default scale is head_dim^-1/2
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(k_, l_, w_))


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(width, heads)
        self.ln_1 = LayerNorm(width, eps=1e-5)
        self.mlp = Mlp(width)
        self.ln_2 = LayerNorm(width, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisualRemnants(nn.Module):
    """The CLIP image tower's top-level tensors, which FluoroSAM never runs.

    FluoroSAM deletes the visual transformer but keeps these tensors, so they are in the released
    state dict. They exist here only so that checkpoint loads strictly with nothing left over (an
    unmatched key would otherwise hide a real mismatch). They are frozen and take no part in forward.
    """

    def __init__(self, width: int, patch_size: int, resolution: int, embed_dim: int) -> None:
        super().__init__()
        grid = resolution // patch_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        nn.init.zeros_(self.conv1.weight)
        self.ln_pre = LayerNorm(width)
        self.ln_post = LayerNorm(width)
        self.requires_grad_(False)


class ClipTextModel(nn.Module):
    """tokens [K, L<=context_length] -> text features [K, feature_dim]."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        if cfg.kind != "clip":
            raise ValueError(f"ClipTextModel needs TextConfig(kind='clip'), got kind={cfg.kind!r}")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_final = LayerNorm(cfg.width, eps=1e-5)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.feature_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.keep_visual_remnants:
            self.visual = VisualRemnants(
                cfg.visual_width, cfg.visual_patch_size, cfg.visual_resolution, cfg.feature_dim
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's own initialisation scheme, for random-init tests and benchmarks."""
        width, layers = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)
        nn.init.normal_(self.text_projection, std=attn_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Any L <= context_length works: with causal attention, positions after the EOT cannot
        change the EOT row, so callers may cut the padding away."""
        if tokens.dim() != 2 or tokens.shape[1] > self.cfg.context_length:
            raise ValueError(f"tokens must be [K, L<={self.cfg.context_length}], got {tuple(tokens.shape)}")
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x))
        eot = tokens.argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection


class ClipTextEncoder(TextEncoder):
    """CLIP tokenizer + text tower behind the TextEncoder interface."""

    kind = "clip"

    def __init__(self, model: ClipTextModel, tokenizer: ClipTokenizer | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else ClipTokenizer()
        self.feature_dim = int(model.text_projection.shape[1])

    def _tokenizer_fingerprint(self) -> bytes:
        return self.tokenizer.fingerprint() + f"\0ctx={self.model.cfg.context_length}".encode()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer.tokenize(texts, self.model.cfg.context_length)
        # Trimming the shared padding is exact (causal attention) and ~7x cheaper for short prompts.
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length].to(self.model.token_embedding.weight.device)
        return self.model(tokens)


def _read_checkpoint(path: Path) -> Mapping[str, torch.Tensor]:
    """TorchScript archives (OpenAI's ViT-B-32.pt) need jit.load; everything else is a plain torch.save."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path} (nothing is downloaded; give a local file)")
    is_torchscript = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            is_torchscript = any("/code/" in name for name in zf.namelist())
    if is_torchscript:
        with warnings.catch_warnings():  # jit is deprecated, but OpenAI ships its weights that way
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _select_prefix(keys: set[str]) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if prefix + "token_embedding.weight" in keys:
            return prefix
    raise ValueError(
        "no CLIP text tower in these weights: none of "
        + ", ".join(f"'{p}token_embedding.weight'" for p in CHECKPOINT_PREFIXES)
        + " is present"
    )


def load_clip_text_weights(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor], cfg: TextConfig
) -> ClipTextModel:
    """Build a ClipTextModel from a local OpenAI-CLIP or FluoroSAM file, strictly.

    Every text-tower key must be present with the right shape and no extra ones may appear (a
    12-layer file must not quietly fill a 2-layer model). The visual transformer and everything
    outside the text tower are skipped on purpose; the visual remnants are loaded when kept and
    present. fp16/bf16 tensors (CUDA-built checkpoints) are cast to float32.
    """
    if isinstance(path_or_state_dict, (str, Path)):
        state = _read_checkpoint(Path(path_or_state_dict))
    else:
        state = path_or_state_dict
    prefix = _select_prefix(set(state))
    model = ClipTextModel(cfg)
    expected = model.state_dict()

    found: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # another part of a full checkpoint (image encoder, decoder...)
        name = key[len(prefix) :]
        root = name.split(".", 1)[0]
        if name in _OPENAI_META_KEYS or name.startswith("visual.transformer."):
            continue  # bookkeeping ints and the deleted/unused visual transformer
        if root == "visual":
            if cfg.keep_visual_remnants and name in expected:
                found[name] = value
            continue  # the rest of the visual tower is dead weight
        if root not in _TEXT_ROOTS:
            continue  # unrelated keys sharing an empty prefix
        if name not in expected:
            unexpected.append(name)
            continue
        found[name] = value

    missing = sorted(k for k in expected if k not in found and not k.startswith("visual."))
    misshaped = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in found.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    )
    if missing or misshaped or unexpected:
        parts = []
        if missing:
            parts.append(f"missing: {missing}")
        if misshaped:
            parts.append(f"mis-shaped: {misshaped}")
        if unexpected:
            parts.append(f"unexpected: {sorted(unexpected)}")
        raise ValueError(f"CLIP text weights (prefix {prefix!r}) do not fit {cfg}: " + "; ".join(parts))

    merged = dict(expected)  # visual remnants absent from the file keep their zero init
    for name, value in found.items():
        value = value.detach()
        merged[name] = value.float() if value.is_floating_point() else value
    model.load_state_dict(merged, strict=True)
    return model.eval()
