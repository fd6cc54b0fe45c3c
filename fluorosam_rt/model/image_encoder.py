"""Image encoder: normalised image -> SAM image embedding [B, out_dim, E, E].

Two builds behind one interface so the rest of the model (prompt encoder, mask decoder, export, node)
never branches on which encoder it got:

* ``kind="swin"``: the official FluoroSAM encoder (mmdet Swin -> EfficientViT SamNeck -> LayerNorm2d).
  Its submodules are named ``backbone.swin``, ``neck``, ``norm`` so that its state_dict equals the
  official checkpoint's ``image_encoder.*`` entries with the prefix stripped.
* ``kind="small"``: the project's real-time encoder (:class:`SmallEncoder`), stored under ``small``.
* ``kind="lite"``: the v2 real-time encoder (:class:`LiteEncoder`: EfficientNet-Lite0 + FPN), stored
  under ``lite``. With the decoder's high-res path on, its output carries the high-res features
  after the embedding channels (:attr:`ImageEncoder.out_channels` counts both).
"""

from __future__ import annotations

import torch
from torch import nn

from fluorosam_rt.model.common import LayerNorm2d
from fluorosam_rt.model.config import ImageEncoderConfig
from fluorosam_rt.model.lite_encoder import HighResSpec, LiteEncoder
from fluorosam_rt.model.neck import SamNeck
from fluorosam_rt.model.small_encoder import SmallEncoder
from fluorosam_rt.model.swin import SwinTransformer

__all__ = ["ImageEncoder", "build_image_encoder"]


class _SwinBackbone(nn.Module):
    """Holds the Swin under ``swin`` only to reproduce the official ``backbone.swin.`` key prefix."""

    def __init__(self, swin: SwinTransformer) -> None:
        super().__init__()
        self.swin = swin

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.swin(x)


class ImageEncoder(nn.Module):
    """Config-driven image encoder; see the module docstring for the two kinds."""

    def __init__(
        self, cfg: ImageEncoderConfig, out_dim: int = 256, high_res: HighResSpec | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.img_size = cfg.img_size
        self.out_dim = out_dim
        self.out_channels = out_dim + (high_res.channels * high_res.factor**2 if high_res is not None else 0)
        if high_res is not None and cfg.kind != "lite":
            raise ValueError(f"the high-res mask path needs the 'lite' image encoder, not {cfg.kind!r}")
        if cfg.kind == "swin":
            swin = SwinTransformer(cfg.swin, img_size=cfg.img_size)
            self.backbone = _SwinBackbone(swin)
            self.neck = SamNeck(swin.num_features[::-1], cfg.neck, out_dim, cfg.embedding_size)
            self.norm = LayerNorm2d(out_dim, eps=1e-5)
        elif cfg.kind == "small":
            self.small = SmallEncoder(cfg.small, out_dim)
        elif cfg.kind == "lite":
            self.lite = LiteEncoder(cfg.lite, out_dim, cfg.img_size, high_res)
        else:
            raise ValueError(f"unknown image encoder kind {cfg.kind!r}")

    @property
    def embedding_size(self) -> int:
        return self.cfg.embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] normalised -> [B, out_channels, E, E]."""
        if self.kind == "small":
            return self.small(x)
        if self.kind == "lite":
            return self.lite(x)
        return self.norm(self.neck(self.backbone(x)))

    def fuse_for_inference(self) -> ImageEncoder:
        """Fold BatchNorm into the convs of a conv encoder (in place, eval mode); Swin: unchanged.

        Changes the state_dict layout: do it on an inference copy, after loading weights.
        """
        if self.kind == "small":
            self.small.fuse_for_inference()
        elif self.kind == "lite":
            self.lite.fuse_for_inference()
        return self

    def forward_intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Swin build only: the stage outputs and the pre-norm neck output too, for numeric checks.

        Returns keys ``swin_stage1..4``, ``neck_out_prenorm`` and ``image_embedding`` (the names of
        the golden fixture).
        """
        if self.kind != "swin":
            raise ValueError("intermediates are defined for the swin encoder only")
        stages = self.backbone(x)
        out: dict[str, torch.Tensor] = {f"swin_stage{i + 1}": s for i, s in enumerate(stages)}
        out["neck_out_prenorm"] = self.neck(stages)
        out["image_embedding"] = self.norm(out["neck_out_prenorm"])
        return out


def build_image_encoder(
    cfg: ImageEncoderConfig, out_dim: int = 256, high_res: HighResSpec | None = None
) -> ImageEncoder:
    """Builder kept as a function so callers (training, export, node) share one entry point."""
    return ImageEncoder(cfg, out_dim, high_res)
