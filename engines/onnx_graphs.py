"""Get a model's verified ONNX graphs from the engine cache, exporting them on first use.

A graph enters the cache only after onnx's checker and the ONNX Runtime parity check against
PyTorch have passed, so every later start (ONNX Runtime or TensorRT build) trusts it without
re-running PyTorch.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fluorosam_rt.model.sam import FluoroSAM

from .base import EngineError
from .cache import EngineCache, EngineKey, model_hash
from .export import GRAPHS, check_graph, export_graph, verify_with_onnxruntime

log = logging.getLogger(__name__)


def onnx_key(graph: str, mhash: str) -> EngineKey:
    return EngineKey(kind="onnx", graph=graph, model_hash=mhash)


def ensure_onnx_graphs(
    model: FluoroSAM,
    cache: EngineCache,
    graphs: tuple[str, ...] = GRAPHS,
    mhash: str | None = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Paths of the model's graphs, exporting (and verifying) those the cache lacks."""
    mhash = mhash or model_hash(model)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for g in graphs:
        p = cache.lookup(onnx_key(g, mhash))
        if p is None:
            missing.append(g)
        else:
            found[g] = p
    if not missing:
        return found
    log.info("exporting ONNX graphs %s for model %s", ", ".join(missing), mhash[:12])
    scratch = cache.scratch_dir()
    try:
        fresh = {g: export_graph(model, g, scratch / f"{g}.onnx") for g in missing}
        for p in fresh.values():
            check_graph(p)
        if verify:
            bad = [r for r in verify_with_onnxruntime(model, fresh) if not r.ok]
            if bad:
                raise EngineError(
                    "exported ONNX graphs disagree with PyTorch: "
                    + "; ".join(
                        f"{r.graph} {r.case}: |dlogits| {r.max_abs_logits:.2e}, "
                        f"|dIoU| {r.max_abs_iou:.2e}, mask agreement {r.mask_agreement:.4f}"
                        for r in bad
                    )
                )
        for g, p in fresh.items():
            found[g] = cache.store(onnx_key(g, mhash), source=p)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return found
