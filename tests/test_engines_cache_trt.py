"""Engine cache keys, TensorRT plans and the rebuild-on-mismatch rule, all without TensorRT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.base import EngineError
from engines.cache import EngineCache, EngineKey, resolve_cache_dir
from engines.trt_plan import GraphDims, TrtEnvironment, binding_plan, call_shapes, profile_shapes, trt_key

H200 = TrtEnvironment("NVIDIA H200", "9.0", "10.9.0")
A100 = TrtEnvironment("NVIDIA A100-SXM4-80GB", "8.0", "10.9.0")
DIMS = GraphDims(
    img_size=448, embed_dim=256, embedding_channels=256, embedding_size=64, low_res_size=512, num_masks=3
)


def test_cache_dir_default_override_and_never_in_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("FLUOROSAM_RT_ENGINE_CACHE", raising=False)
    assert resolve_cache_dir() == (Path.home() / ".cache/fluorosam-rt/engines").resolve()
    monkeypatch.setenv("FLUOROSAM_RT_ENGINE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == (tmp_path / "env").resolve()
    assert resolve_cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    with pytest.raises(EngineError, match="inside the source repository"):
        resolve_cache_dir(Path(__file__).parent / "engines-cache")


def test_trt_key_carries_gpu_cc_version_precision_and_model():
    k = trt_key(H200, "decoder", "ab" * 32, "fp16", 16, 8)
    name = k.filename()
    for part in ("decoder", "abababababab", "fp16", "NVIDIA_H200", "sm90", "trt10.9.0", "k16"):
        assert part in name
    assert name.endswith(".engine")
    variants = [
        trt_key(A100, "decoder", "ab" * 32, "fp16", 16, 8),
        trt_key(H200, "decoder", "ab" * 32, "fp32", 16, 8),
        trt_key(TrtEnvironment("NVIDIA H200", "9.0", "10.10.0"), "decoder", "ab" * 32, "fp16", 16, 8),
        trt_key(H200, "decoder", "cd" * 32, "fp16", 16, 8),
        trt_key(H200, "decoder", "ab" * 32, "fp16", 32, 8),
    ]
    assert len({v.filename() for v in [k, *variants]}) == 6
    with pytest.raises(ValueError, match="precision"):
        trt_key(H200, "decoder", "ab" * 32, "int8", 16, 8)


def test_profile_shapes_cover_k_and_clicks():
    prof = {p.name: p for p in profile_shapes(DIMS, "decoder_points", max_prompts=16, max_points=8)}
    assert list(prof) == ["embedding", "tokens", "point_coords", "point_labels"]
    assert prof["embedding"].min == prof["embedding"].max == (1, 256, 64, 64)
    assert (prof["tokens"].min, prof["tokens"].opt, prof["tokens"].max) == ((1, 256), (3, 256), (16, 256))
    assert prof["point_coords"].max == (16, 8, 2)
    assert prof["point_labels"].min == (1, 1)
    enc = profile_shapes(DIMS, "encoder", 16)
    assert [(p.name, p.min, p.max) for p in enc] == [("image", (1, 3, 448, 448), (1, 3, 448, 448))]
    with pytest.raises(ValueError, match="max_prompts"):
        profile_shapes(DIMS, "decoder", 0)


def test_binding_plan_preallocates_max_shapes_and_calls_are_checked():
    plan = {b.name: b for b in binding_plan(DIMS, "decoder", max_prompts=10)}
    assert plan["low_res_logits"].max_shape == (10, 3, 512, 512)
    assert not plan["low_res_logits"].is_input
    assert plan["tokens"].is_input
    assert plan["tokens"].nbytes == 10 * 256 * 4
    assert call_shapes(DIMS, "decoder", 3, 0, 10, 8)["iou"] == (3, 3)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        call_shapes(DIMS, "decoder", 11, 0, 10, 8)
    with pytest.raises(ValueError, match="clicks"):
        call_shapes(DIMS, "decoder_points", 2, 9, 10, 8)


def test_cache_lookup_rejects_other_keys_and_corrupted_files(tmp_path):
    cache = EngineCache(tmp_path)
    key = trt_key(H200, "encoder", "ab" * 32, "fp16", 16, 8)
    path = cache.store(key, data=b"plan-bytes")
    assert cache.lookup(key) == path
    assert cache.lookup(trt_key(A100, "encoder", "ab" * 32, "fp16", 16, 8)) is None
    path.write_bytes(b"truncated")
    assert cache.lookup(key) is None
    assert [e["intact"] for e in cache.entries()] == [False]
    (tmp_path / "manifest.json").write_text("{not json")
    assert cache.entries() == []


@pytest.fixture(scope="module")
def tiny_model():
    from fluorosam_rt.model.build import build_model
    from fluorosam_rt.model.config import small_realtime

    torch.manual_seed(0)
    return build_model(small_realtime(64), with_text_model=False).eval()


def test_mismatched_engine_is_rebuilt_never_loaded(tiny_model, tmp_path, monkeypatch, caplog):
    import engines.tensorrt_engine as te

    cache = EngineCache(tmp_path)
    fake_onnx = {g: tmp_path / f"{g}.onnx" for g in ("encoder", "decoder", "decoder_points")}
    monkeypatch.setattr(te, "ensure_onnx_graphs", lambda *a, **k: fake_onnx)
    built: list[tuple[str, str]] = []

    def fake_build(onnx_path, profiles, precision, timing_cache):
        built.append((onnx_path.stem, precision))
        assert timing_cache.name.startswith("timing-")
        assert timing_cache.parent == cache.root
        assert profiles
        assert all(p.min[0] <= p.opt[0] <= p.max[0] for p in profiles)
        return f"plan:{onnx_path.stem}:{precision}".encode()

    on_a100 = te.ensure_trt_engines(tiny_model, cache, A100, "fp16", 8, 4, build_fn=fake_build)
    assert len(built) == 3
    again = te.ensure_trt_engines(tiny_model, cache, A100, "fp16", 8, 4, build_fn=fake_build)
    assert again == on_a100
    assert len(built) == 3
    with caplog.at_level("WARNING"):
        on_h200 = te.ensure_trt_engines(tiny_model, cache, H200, "fp16", 8, 4, build_fn=fake_build)
    assert len(built) == 6  # all three rebuilt for the other GPU
    assert set(on_h200.values()).isdisjoint(on_a100.values())
    assert "NVIDIA A100" in caplog.text
    assert "NVIDIA H200" in caplog.text
    assert "rebuilding" in caplog.text
    te.ensure_trt_engines(tiny_model, cache, H200, "fp32", 8, 4, build_fn=fake_build)
    assert built[-1][1] == "fp32"
    assert len(built) == 9


def test_tensorrt_engine_says_why_it_cannot_load(tiny_model, tmp_path):
    from engines.tensorrt_engine import TensorRTEngine, probe_tensorrt

    why = probe_tensorrt()
    if why is None:
        pytest.skip("TensorRT and CUDA are present: covered by the trt end-to-end test")
    assert "tensorrt" in why
    with pytest.raises(EngineError, match="tensorrt"):
        TensorRTEngine(tiny_model, EngineCache(tmp_path))


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_end_to_end_against_pytorch(tiny_model, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from engines.export import compare_outputs
    from engines.tensorrt_engine import TensorRTEngine

    eng = TensorRTEngine(tiny_model, EngineCache(tmp_path), precision="fp32", max_prompts=8)
    x = torch.randn(1, 3, 64, 64)
    ref_emb = tiny_model.encode_image(x)
    emb = eng.encode_image(x).cpu()
    assert (emb - ref_emb).abs().max() < 1e-2
    tok = torch.randn(5, tiny_model.cfg.prompt_encoder.embed_dim)
    rl, ri = tiny_model.decode(ref_emb, tok)
    lo, io = eng.decode(ref_emb, tok)
    p = compare_outputs("trt", "K=5", (rl.numpy(), ri.numpy()), (lo.cpu().numpy(), io.cpu().numpy()))
    assert p.mask_agreement > 0.99, p
    assert isinstance(EngineKey.from_dict({"kind": "trt", "graph": "x", "model_hash": "y"}), EngineKey)
