"""Text encoders behind one interface: prompt strings -> [K, feature_dim] float32 features.

``clip`` is the official FluoroSAM text tower (needs local weights); ``minilm`` is the embedded
default, shipped as a Python package so it works offline with nothing to download.
"""

from __future__ import annotations

from pathlib import Path

from fluorosam_rt.model.config import TextConfig
from fluorosam_rt.text.base import TextEncoder, normalize_prompt
from fluorosam_rt.text.clip import ClipTextEncoder, ClipTextModel, load_clip_text_weights
from fluorosam_rt.text.clip_tokenizer import ClipTokenizer, clean_text, default_vocab_path
from fluorosam_rt.text.minilm import MiniLMTextEncoder, default_minilm_dir

__all__ = [
    "ClipTextEncoder",
    "ClipTextModel",
    "ClipTokenizer",
    "MiniLMTextEncoder",
    "TextEncoder",
    "build_text_encoder",
    "clean_text",
    "default_minilm_dir",
    "default_vocab_path",
    "load_clip_text_weights",
    "normalize_prompt",
]


def build_text_encoder(
    cfg: TextConfig, weights: str | Path | None = None, *, random_init: bool = False
) -> TextEncoder:
    """The configured encoder, in eval mode.

    For ``clip``, ``weights`` is a local CLIP/FluoroSAM checkpoint. A randomly initialised CLIP
    is returned only with ``random_init=True``, so a forgotten path can never silently produce
    meaningless features. For ``minilm``, ``weights`` optionally overrides the model directory.
    """
    if cfg.kind == "clip":
        if weights is not None and random_init:
            raise ValueError("give either CLIP weights or random_init=True, not both")
        if weights is not None:
            model = load_clip_text_weights(weights, cfg)
        elif random_init:
            model = ClipTextModel(cfg)
        else:
            raise ValueError(
                "the CLIP text encoder needs a local weights file (OpenAI ViT-B-32.pt or a FluoroSAM "
                "checkpoint); pass random_init=True only for tests and benchmarks"
            )
        encoder: TextEncoder = ClipTextEncoder(model)
    elif cfg.kind == "minilm":
        if random_init:
            raise ValueError("random_init applies to CLIP only; MiniLM always loads its packaged weights")
        encoder = MiniLMTextEncoder(weights)
    else:
        raise ValueError(f"unknown text encoder kind {cfg.kind!r}")
    if encoder.feature_dim != cfg.feature_dim:
        raise ValueError(
            f"{cfg.kind} encoder produces {encoder.feature_dim}-d features but TextConfig.feature_dim "
            f"is {cfg.feature_dim}"
        )
    return encoder.eval()
