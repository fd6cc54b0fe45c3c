"""The FluoroSAM model, one file per part (as segment-anything lays it out)."""

from .build import build_model
from .config import ModelConfig, golden_reduced, official_swin_l
from .sam import FluoroSAM

__all__ = ["FluoroSAM", "ModelConfig", "build_model", "golden_reduced", "official_swin_l"]
