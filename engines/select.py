"""Pick a back end by name, or the fastest one that loads here, and say why: ``create_engine``.

``auto`` walks a fixed order, fastest first, and every back end that cannot load logs precisely
why before the next one is tried. An explicit name is tried first and then falls back along
the same order (unless strict), so a node configured for TensorRT still comes up on a laptop.

Order on a CUDA machine: trt (fp16 plans) -> torch-compiled (fp16, CUDA graphs) -> torch
(CUDA) -> onnxruntime (CPU) -> torch (CPU). On a CPU-only machine: onnxruntime -> torch;
ONNX Runtime measured faster than eager PyTorch for the default model on CPU (docs/engines.md)
and torch.compile is not in the CPU chain because it compiles for minutes at start-up on a
small CPU for a gain that ONNX Runtime already delivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluorosam_rt.model.sam import FluoroSAM

from .base import Engine, EngineError
from .chain import EngineChain, Loaded

log = logging.getLogger("engines.select")
ENGINE_CHOICES = ("auto", "trt", "torch-compiled", "onnxruntime", "torch")


@dataclass
class EngineOptions:
    """Settings that reach whichever back end is chosen."""

    precision: str | None = None  # fp32 | fp16 | bf16; default: fp16 on CUDA, fp32 on CPU
    threads: int = 0  # ONNX Runtime intra-op threads (0: ORT's choice)
    cache_dir: str | Path | None = None
    max_prompts: int = 16
    cuda_graphs: bool | None = None
    extra: dict = field(default_factory=dict)


def auto_chain(cuda: bool) -> list[tuple[str, str]]:
    """(back end, device) in the order auto tries them."""
    if cuda:
        return [
            ("trt", "cuda"),
            ("torch-compiled", "cuda"),
            ("torch", "cuda"),
            ("onnxruntime", "cpu"),
            ("torch", "cpu"),
        ]
    return [("onnxruntime", "cpu"), ("torch", "cpu")]


def candidate_chain(name: str, cuda: bool, strict: bool = False) -> list[tuple[str, str]]:
    """(back end, device) in the order create_engine tries them for name."""
    check_engine_name(name)
    chain = auto_chain(cuda)
    if name == "auto":
        return chain
    first = [c for c in chain if c[0] == name] or [(name, "cuda" if cuda else "cpu")]
    if strict:
        return first[:1]
    return first[:1] + [c for c in chain if c != first[0]]


def _build(name: str, device: str, model: FluoroSAM, opts: EngineOptions) -> Engine:
    from .cache import EngineCache

    if name == "torch":
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("torch on CUDA: torch.cuda.is_available() is False")
        from .torch_engine import TorchEngine

        return TorchEngine(model, device)
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(model, EngineCache(opts.cache_dir), intra_op_threads=opts.threads)
    if name == "torch-compiled":
        from .compiled_engine import TorchCompiledEngine

        precision = opts.precision or ("fp16" if device == "cuda" else "fp32")
        return TorchCompiledEngine(model, device, precision=precision, cuda_graphs=opts.cuda_graphs)
    if name == "trt":
        from .tensorrt_engine import TensorRTEngine, probe_tensorrt

        why = probe_tensorrt()
        if why is not None:
            raise EngineError(why)
        precision = opts.precision or "fp16"
        return TensorRTEngine(
            model, EngineCache(opts.cache_dir), precision=precision, max_prompts=opts.max_prompts
        )
    raise EngineError(f"unknown engine {name!r}")


def load_backend(
    name: str,
    model: FluoroSAM,
    options: EngineOptions | None = None,
    strict: bool = False,
    cuda: bool | None = None,
    device: str | None = None,
    builder: Callable[[str, str, FluoroSAM, EngineOptions], Engine] = _build,
) -> Loaded:
    """The first back end of the chain for name that loads; logs every one that did not.

    Raises EngineError listing every reason when nothing loads. What it returns carries how the
    back end was chosen (``selected_by``, ``reason``, and ``skipped``: what was passed over and
    why), which the node reports on its status.
    """
    opts = options or EngineOptions()
    if cuda is None:
        # device="cpu" keeps every candidate on the CPU even where a GPU exists.
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    skipped: list[str] = []
    for backend, dev in candidate_chain(name, cuda, strict):
        label = f"{backend} ({dev})"
        try:
            engine = builder(backend, dev, model, opts)
        except (EngineError, ImportError, RuntimeError, OSError) as exc:
            log.warning("engine %s cannot load: %s; trying the next one", label, exc)
            skipped.append(f"{label}: {exc}")
            continue
        reason = (
            "requested"
            if backend == name
            else ("fastest available" if name == "auto" else f"fallback for {name}")
        )
        log.info("engine: %s chosen (%s)%s", label, reason, f"; skipped {len(skipped)}" if skipped else "")
        return Loaded(engine, {"selected_by": name, "reason": reason, "skipped": skipped})
    raise EngineError(f"no engine could load for {name!r}: " + " | ".join(skipped))


@dataclass
class EngineSettings:
    """Which back end to run and what to fall back to: the node's ``model`` settings, the CLIs' flags.

    ``engine``: a name of ENGINE_CHOICES, tried first and then along the chain (unless ``strict``).
    ``fallback_engines``: loaded at start, switched to in order after ``max_consecutive_failures``
    failures in a row at run time. ``device``: None lets CUDA be used where it is available.
    """

    engine: str = "auto"
    fallback_engines: Sequence[str] = ()
    max_consecutive_failures: int = 5
    device: str | None = None
    strict: bool = False
    options: EngineOptions = field(default_factory=EngineOptions)


def create_engine(
    settings: EngineSettings,
    model: FluoroSAM,
    cuda: bool | None = None,
    builder: Callable[[str, str, FluoroSAM, EngineOptions], Engine] = _build,
) -> EngineChain:
    """The engine for the frame path: the chosen back end and its run-time fallbacks, all loaded.

    The one factory serve, segment, the benchmark and evaluation use; raises EngineError (every
    reason listed) when the requested back end or a fallback cannot load at all.
    """
    for name in (settings.engine, *settings.fallback_engines):
        check_engine_name(name)

    def load(name: str) -> Loaded:
        return load_backend(
            name, model, settings.options, settings.strict, cuda=cuda, device=settings.device, builder=builder
        )

    return EngineChain(
        load(settings.engine),
        [load(n) for n in settings.fallback_engines],
        settings.max_consecutive_failures,
    )


def check_engine_name(name: str) -> str:
    """The name if it is one of ENGINE_CHOICES; EngineError naming the choices otherwise."""
    if name not in ENGINE_CHOICES:
        raise EngineError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_CHOICES)}")
    return name
