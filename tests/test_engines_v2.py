"""Every inference path sized from the model's real embedding, and the v2 model through each.

The v2 image embedding is wider than the prompt tokens (128 embedding + 1024 packed high-res
channels = 1152 against 128): graph shapes, TensorRT profiles and buffers, BatchNorm folding and
the GPU check must follow ``model.embedding_channels``, not the prompt width. TensorRT does not
run here, so its plans are checked against the tensors the model itself produces.
"""

from __future__ import annotations

import json

import pytest
import torch

from engines.base import GraphDims
from engines.cache import EngineCache
from engines.torch_engine import TorchEngine
from engines.trt_plan import TrtEnvironment, binding_plan, profile_shapes
from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import realtime_v2, small_realtime

H200 = TrtEnvironment("NVIDIA H200", "9.0", "10.9.0")


def has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and high-res weights, so folding and shapes are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        hq = getattr(getattr(model.image_encoder, "lite", None), "high_res", None)
        if hq is not None:  # zero-initialised output: give it weights so its channels carry data
            hq.out.weight.copy_(torch.randn(hq.out.weight.shape, generator=g) * 0.2)
            hq.out.bias.copy_(torch.randn(hq.out.bias.shape, generator=g) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def v2_tiny():
    torch.manual_seed(0)
    return _randomise(build_model(realtime_v2(64), with_text_model=False))


@pytest.fixture(scope="module")
def small_tiny():
    torch.manual_seed(0)
    return _randomise(build_model(small_realtime(64), with_text_model=False))


@pytest.mark.parametrize("which", ["small_tiny", "v2_tiny"])
@torch.no_grad()
def test_graph_shapes_are_the_tensors_the_model_produces(which, request):
    model = request.getfixturevalue(which)
    dims = GraphDims.of(model)
    enc = dims.shapes("encoder")
    emb = model.encode_image(torch.zeros(enc["image"]))
    assert tuple(emb.shape) == enc["embedding"]
    for k, n in ((1, 1), (3, 2)):
        dec = dims.shapes("decoder_points", k, n)
        assert dec["embedding"] == enc["embedding"]
        tokens = torch.randn(dec["tokens"])
        coords = torch.rand(dec["point_coords"]) * dims.img_size
        labels = torch.ones(dec["point_labels"])
        low, iou = model.decode(emb, tokens, coords.double(), labels)
        assert (tuple(low.shape), tuple(iou.shape)) == (dec["low_res_logits"], dec["iou"])


def test_v2_embedding_is_wider_than_the_prompts_everywhere_shapes_are_planned(v2_tiny):
    dims = GraphDims.of(v2_tiny)
    assert dims.embed_dim == 128
    assert dims.embedding_channels == v2_tiny.embedding_channels == 128 + 16 * 8 * 8
    e = dims.embedding_size
    for graph in ("encoder", "decoder", "decoder_points"):
        prof = {p.name: p for p in profile_shapes(dims, graph, max_prompts=16, max_points=8)}
        plan = {b.name: b for b in binding_plan(dims, graph, max_prompts=16, max_points=8)}
        assert plan["embedding"].max_shape == (1, 1152, e, e)
        assert plan["embedding"].nbytes == 4 * 1152 * e * e
        if graph != "encoder":
            assert prof["embedding"].min == prof["embedding"].max == (1, 1152, e, e)
            assert prof["tokens"].max == (16, 128)


def test_v2_trt_build_gets_profiles_for_its_real_embedding(v2_tiny, tmp_path, monkeypatch):
    import engines.tensorrt_engine as te

    fake_onnx = {g: tmp_path / f"{g}.onnx" for g in ("encoder", "decoder", "decoder_points")}
    monkeypatch.setattr(te, "ensure_onnx_graphs", lambda *a, **k: fake_onnx)
    seen: dict[str, dict] = {}

    def fake_build(onnx_path, profiles, precision, timing_cache):
        seen[onnx_path.stem] = {p.name: p for p in profiles}
        return b"plan"

    te.ensure_trt_engines(v2_tiny, EngineCache(tmp_path / "cache"), H200, "fp16", 8, 4, build_fn=fake_build)
    with torch.no_grad():
        want = tuple(v2_tiny.encode_image(torch.zeros(1, 3, 64, 64)).shape)
    assert want[1] == v2_tiny.embedding_channels
    for graph in ("decoder", "decoder_points"):
        assert seen[graph]["embedding"].max == want
        assert seen[graph]["tokens"].max == (8, 128)


@torch.no_grad()
def test_torch_engine_folds_v2_batchnorm_and_matches_unfolded(v2_tiny):
    keys = set(v2_tiny.state_dict())
    engine = TorchEngine(v2_tiny)
    assert not has_batchnorm(engine.image_encoder)
    assert has_batchnorm(v2_tiny.image_encoder)  # the model itself is untouched
    assert set(v2_tiny.state_dict()) == keys
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref, got = v2_tiny.encode_image(x), engine.encode_image(x)
    assert ref[:, 128:].abs().max() > 1e-2  # the high-res channels carry data in this check
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    tok = torch.randn(3, 128)
    torch.testing.assert_close(engine.decode(got, tok)[0], v2_tiny.decode(ref, tok)[0], atol=1e-3, rtol=1e-3)


def test_compiled_engine_folds_batchnorm_on_its_copy(v2_tiny):
    from engines.compiled_engine import TorchCompiledEngine

    eng = TorchCompiledEngine(v2_tiny, "cpu", compile=False)
    assert not has_batchnorm(eng.encoder)
    assert has_batchnorm(v2_tiny.image_encoder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eng.encode_image(x), v2_tiny.encode_image(x), atol=1e-4, rtol=1e-4)


def test_gpu_check_builds_and_checks_v2_on_cpu(tmp_path):
    """The GPU script's CPU-side code path for v2 (the lent GPU runs the same code with CUDA)."""
    from engines.gpu_check import PRESETS, main

    assert {"small", "v2", "official"} <= set(PRESETS)
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--models", "v2-tiny", "--runs", "1", "--warmup", "0"]
    assert main([*argv, "--prompts", "1,3", "--no-compile", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())["models"]["v2-tiny"]
    assert rep["config"] == "fluorosam-rt-v2"
    assert rep["embedding"] == [1, 1152, 8, 8]
    assert set(rep["variants"]) == {"eager-fp32", "padded-fp32"}
    for v in rep["variants"].values():
        assert v["parity_vs_cpu_fp32"]["ok"], v
        assert set(v["decode"]) == {"1", "3"}
    assert main(["--device", "cpu", "--models", "v3", "--out", str(out)]) == 2
