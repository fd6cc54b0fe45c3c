"""Export the frame path to ONNX and prove the graphs compute what PyTorch computes.

Three files come out of one model: the image encoder, the text-only prompt decoder and the
prompt decoder with clicks. Text-only and clicked prompts need separate decoder graphs because
a clicked prompt carries an extra padding-point token that a text-only prompt must not see; a
single graph with N = 0 points cannot express "no padding token" in every runtime.

The number of prompts K (and of clicks N) is a dynamic axis. The frame's embedding enters at
batch 1 and stays at batch 1 through the prompt-independent part of the decoder (projections
of the image tokens), exactly as in PyTorch: the export traces with K = 2 so that every place
where the model broadcasts a batch-1 tensor over the prompts becomes an Expand in the graph.

We use the TorchScript exporter (``dynamo=False``): the dynamo exporter needs onnxscript, which
is not a dependency, and the traced graphs are plain opset-17 ops every runtime, TensorRT
included, accepts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fluorosam_rt.model.sam import FluoroSAM

from .graphs import FrameDecoder, FrameEncoder

OPSET = 17
GRAPHS = ("encoder", "decoder", "decoder_points")
ENCODER_IO = (["image"], ["embedding"])
DECODER_IO = (["embedding", "tokens"], ["low_res_logits", "iou"])
DECODER_POINTS_IO = (["embedding", "tokens", "point_coords", "point_labels"], ["low_res_logits", "iou"])

# Stated ONNX Runtime vs PyTorch (both fp32, CPU) tolerances, checked on every CI run.
LOGITS_ATOL = 1e-3  # absolute, on low-res logits
IOU_ATOL = 1e-3
MASK_AGREEMENT_MIN = 0.999  # fraction of low-res pixels whose (logit > 0) decision agrees


def graph_io(graph: str) -> tuple[list[str], list[str]]:
    return {"encoder": ENCODER_IO, "decoder": DECODER_IO, "decoder_points": DECODER_POINTS_IO}[graph]


def _layer_norm_symbolic(g, x, normalized_shape, weight, bias, eps, cudnn_enable):  # type: ignore[no-untyped-def]
    """aten::layer_norm whose normalized_shape was traced from ``x.shape[-n:]``.

    The stock symbolic insists on a constant list, but code that writes
    ``F.layer_norm(x, (x.shape[-1],), ...)`` hands the tracer a list of traced sizes. Only the
    list's length matters to ONNX (the axis); it is the number of list elements.
    """
    from torch.onnx import symbolic_helper as sh

    node = normalized_shape.node()
    if node.kind() == "prim::ListConstruct":
        n = len(list(node.inputs()))
    else:
        n = len(sh._maybe_get_const(normalized_shape, "is"))
    return g.op(
        "LayerNormalization", x, weight, bias, axis_i=-n, epsilon_f=float(sh._maybe_get_const(eps, "f"))
    )


def _export(module: torch.nn.Module, args: tuple, path: Path, graph: str, dynamic: dict) -> Path:
    inputs, outputs = graph_io(graph)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::layer_norm", _layer_norm_symbolic, OPSET)
    try:
        _run_export(module, args, path, inputs, outputs, dynamic)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::layer_norm", OPSET)
    return path


def _run_export(
    module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict
) -> None:
    with warnings.catch_warnings():
        # The tracer warns about Python-level shape comparisons in Attention; they are the
        # batch-1 broadcast decisions, and tracing with K = 2 makes them generalise.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )


def example_inputs(model: FluoroSAM, k: int = 2, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs with the graphs' shapes; also used by the parity checks."""
    g = torch.Generator().manual_seed(seed)
    s, c = model.img_size, model.cfg.prompt_encoder.embed_dim
    e = model.cfg.image_encoder.embedding_size
    coords = torch.rand((k, n, 2), generator=g) * (s - 1)
    labels = (torch.rand((k, n), generator=g) > 0.3).float()
    return {
        "image": torch.randn((1, 3, s, s), generator=g),
        # v2 models append high-res features to the embedding channels (model.embedding_channels)
        "embedding": torch.randn((1, model.embedding_channels, e, e), generator=g),
        "tokens": torch.randn((k, c), generator=g),
        "point_coords": coords,
        "point_labels": labels,
    }


@torch.no_grad()
def export_graph(model: FluoroSAM, graph: str, path: str | Path) -> Path:
    """Export one of GRAPHS to path (float32 weights and I/O)."""
    model = model.eval()
    ex = example_inputs(model)
    path = Path(path)
    kdim = {0: "K"}
    if graph == "encoder":
        return _export(FrameEncoder(model), (ex["image"],), path, graph, {})
    dec = FrameDecoder(model)
    if graph == "decoder":
        dyn = {"tokens": kdim, "low_res_logits": kdim, "iou": kdim}
        return _export(dec, (ex["embedding"], ex["tokens"]), path, graph, dyn)
    if graph == "decoder_points":
        dyn = {
            "tokens": kdim,
            "point_coords": {0: "K", 1: "N"},
            "point_labels": {0: "K", 1: "N"},
            "low_res_logits": kdim,
            "iou": kdim,
        }
        args = (ex["embedding"], ex["tokens"], ex["point_coords"], ex["point_labels"])
        return _export(dec, args, path, graph, dyn)
    raise ValueError(f"unknown graph {graph!r}; choose from {GRAPHS}")


def check_graph(path: str | Path) -> None:
    """onnx's full checker (with shape inference); raises onnx.checker.ValidationError."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


@dataclass
class Parity:
    """How far ONNX Runtime is from PyTorch on one graph and input set."""

    graph: str
    case: str
    max_abs_logits: float = 0.0
    max_abs_iou: float = 0.0
    mask_agreement: float = 1.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_logits <= LOGITS_ATOL
            and self.max_abs_iou <= IOU_ATOL
            and self.mask_agreement >= MASK_AGREEMENT_MIN
        )


def compare_outputs(
    graph: str, case: str, ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]
) -> Parity:
    """Logits/IoU distance and mask agreement between a reference and a candidate."""
    (rl, ri), (gl, gi) = ref, got
    if rl.shape != gl.shape or ri.shape != gi.shape:
        raise AssertionError(f"{graph}/{case}: shapes {gl.shape}/{gi.shape} != {rl.shape}/{ri.shape}")
    return Parity(
        graph=graph,
        case=case,
        max_abs_logits=float(np.abs(rl - gl).max()),
        max_abs_iou=float(np.abs(ri - gi).max()),
        mask_agreement=float(((rl > 0) == (gl > 0)).mean()),
    )


@torch.no_grad()
def verify_with_onnxruntime(
    model: FluoroSAM, paths: dict[str, Path], ks: tuple[int, ...] = (1, 3, 5), n_points: int = 3
) -> list[Parity]:
    """Run every graph in ONNX Runtime against the PyTorch model itself (not the wrappers).

    The reference is ``FluoroSAM.encode_image`` / ``FluoroSAM.decode`` with float64 points,
    so the wrappers' float32 point path is checked too. K values other than the traced K = 2
    prove the prompt axis really is dynamic.
    """
    import onnxruntime as ort

    model = model.eval()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sessions = {
        g: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for g, p in paths.items()
    }
    out: list[Parity] = []
    ex = example_inputs(model, k=max(ks), n=n_points, seed=1)
    if "encoder" in sessions:
        ref = model.encode_image(ex["image"]).numpy()
        (got,) = sessions["encoder"].run(None, {"image": ex["image"].numpy()})
        d = float(np.abs(ref - got).max())
        out.append(Parity("encoder", "image", max_abs_logits=d))
        emb = torch.from_numpy(got)
    else:
        emb = ex["embedding"]
    for k in ks:
        tok = ex["tokens"][:k]
        if "decoder" in sessions:
            rl, ri = model.decode(emb, tok)
            got = sessions["decoder"].run(None, {"embedding": emb.numpy(), "tokens": tok.numpy()})
            out.append(compare_outputs("decoder", f"K={k}", (rl.numpy(), ri.numpy()), tuple(got)))
        if "decoder_points" in sessions:
            pc, pl = ex["point_coords"][:k], ex["point_labels"][:k]
            rl, ri = model.decode(emb, tok, pc.double(), pl)
            feeds = {
                "embedding": emb.numpy(),
                "tokens": tok.numpy(),
                "point_coords": pc.numpy(),
                "point_labels": pl.numpy(),
            }
            got = sessions["decoder_points"].run(None, feeds)
            out.append(
                compare_outputs("decoder_points", f"K={k},N={n_points}", (rl.numpy(), ri.numpy()), tuple(got))
            )
    return out
