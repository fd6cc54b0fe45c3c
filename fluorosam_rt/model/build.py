"""Build a FluoroSAM module from a ModelConfig: the one place models are constructed."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .sam import FluoroSAM


def build_model(cfg: ModelConfig, with_text_model: bool | None = None) -> FluoroSAM:
    """Construct the model with freshly initialised weights.

    with_text_model: nest the CLIP text tower at ``prompt_encoder.text_model`` as the official
    build does (default: yes for CLIP configs). Other text encoders live outside the model and
    are identified by hash, so the embedded model's file stays small.
    """
    if with_text_model is None:
        with_text_model = cfg.text.kind == "clip"
    text_model: nn.Module | None = None
    if with_text_model:
        if cfg.text.kind != "clip":
            raise ValueError("only the CLIP text tower is nested inside the model")
        from ..text.clip import ClipTextModel

        text_model = ClipTextModel(cfg.text)
    return FluoroSAM(cfg, text_model=text_model)
