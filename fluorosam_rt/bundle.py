"""A ready-to-run model: segmentation weights, the matching text encoder, calibration values.

Both the CLI and the node start from here, so a checkpoint is interpreted one way only. When no
checkpoint is given, the embedded default model that ships inside the package is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines.base import Engine

from .checkpoint import CheckpointError, LoadReport, detect_format, load_native, load_official
from .model.sam import FluoroSAM
from .prompt_hints import PromptHints
from .prompts import PromptCache
from .text.base import TextEncoder

if TYPE_CHECKING:
    from .predictor import Predictor

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_PATH = ASSETS_DIR / "default_model.safetensors"


@dataclass
class ModelBundle:
    model: FluoroSAM
    text_encoder: TextEncoder
    presence_threshold: float = 0.0
    name: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    report: LoadReport | None = None
    prompt_seed: Path | None = None  # a shipped prompt-token cache that travels with the weights

    def prompt_cache(self) -> PromptCache:
        """The prompt cache for this model, seeded from the tokens shipped beside its weights."""
        from .predictor import token_identity

        return PromptCache(token_identity(self.model, self.text_encoder), seed=self.prompt_seed)

    def predictor(
        self,
        engine: Engine | None = None,
        presence_threshold: float | None = None,
        mask_threshold: float = 0.0,
        device: str = "cpu",
    ) -> Predictor:
        """The predictor for this model: its shipped prompt cache, its calibrated presence threshold
        (unless one is given), the engine given (default: PyTorch eager on ``device``).

        The one way a bundle becomes a predictor: segment, the node, the benchmark and evaluation.
        """
        from .predictor import Predictor

        return Predictor(
            self.model,
            self.text_encoder,
            cache=self.prompt_cache(),
            presence_threshold=self.presence_threshold if presence_threshold is None else presence_threshold,
            mask_threshold=mask_threshold,
            device=device,
            engine=engine,
        )

    def prompt_hints(self) -> PromptHints:
        """'Did you mean' hints for this model's text encoder: a table shipped beside the weights or with the
        package (the embedded encoder's), else one built into the user cache (fluorosam_rt.prompt_hints)."""
        from .prompt_hints import PromptHints

        return PromptHints(self.text_encoder, search=[self.prompt_seed, ASSETS_DIR / "prompt_cache"])


def _text_encoder_for_native(spec: dict[str, Any], source: str) -> TextEncoder:
    kind = spec.get("kind")
    if kind == "minilm":
        from .text.minilm import MiniLMTextEncoder

        enc: TextEncoder = MiniLMTextEncoder()
    else:
        raise CheckpointError(f"{source}: text encoder kind {kind!r} is not available for native checkpoints")
    want = spec.get("identity")
    if want and enc.identity() != want:
        raise CheckpointError(
            f"{source}: the installed {kind} text encoder differs from the one the model was trained with "
            f"(identity {enc.identity()[:12]} != {want[:12]}); its prompt tokens would be wrong"
        )
    return enc


def load_bundle(
    checkpoint: str | Path | None = None,
    fmt: str = "auto",
    clip_weights: str | Path | None = None,
    allow_partial: bool = False,
    trust_pickle: bool = False,
) -> ModelBundle:
    """Load a checkpoint (default: the embedded model) with its text encoder.

    fmt: 'official' (FluoroSAM Lightning/bare state dict), 'native' (our .safetensors) or
    'auto' (by file content).
    """
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_MODEL_PATH
    if checkpoint is None and not path.is_file():
        raise CheckpointError(
            f"the embedded default model is not installed at {path}; pass --checkpoint PATH "
            "(an official FluoroSAM checkpoint or a fluorosam-rt .safetensors model)"
        )
    if fmt not in ("auto", "official", "native"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; use official, native or auto")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "native":
        nm = load_native(path, allow_partial=allow_partial)
        enc = _text_encoder_for_native(nm.text_encoder, str(path))
        return ModelBundle(
            model=nm.model,
            text_encoder=enc,
            presence_threshold=float(nm.meta.get("presence_threshold", 0.0)),
            name=nm.model.cfg.name,
            source=str(path),
            meta=nm.meta,
            report=nm.report,
            # Convention: a native model's vocabulary tokens ship in prompt_cache/ beside it.
            prompt_seed=path.parent / "prompt_cache" if (path.parent / "prompt_cache").is_dir() else None,
        )
    model, report = load_official(
        path, clip_weights=clip_weights, allow_partial=allow_partial, trust_pickle=trust_pickle
    )
    text_model = model.prompt_encoder.text_model
    if text_model is None:
        raise CheckpointError(f"{path}: no CLIP text tower in the checkpoint; pass --clip-weights PATH")
    from .text.clip import ClipTextEncoder

    return ModelBundle(
        model=model,
        text_encoder=ClipTextEncoder(text_model),
        # The official gate: predicted IoU below 0 means "not present".
        presence_threshold=0.0,
        name=model.cfg.name,
        source=str(path),
        report=report,
    )
