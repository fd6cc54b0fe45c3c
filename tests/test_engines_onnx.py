"""ONNX export and ONNX Runtime parity against PyTorch (runs on every CI run, CPU only).

Stated tolerances (engines/export.py): |logits| <= 1e-3, |IoU| <= 1e-3, mask agreement >= 99.9%.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from engines.cache import EngineCache, model_hash
from engines.export import (
    IOU_ATOL,
    LOGITS_ATOL,
    MASK_AGREEMENT_MIN,
    compare_outputs,
    verify_with_onnxruntime,
)
from engines.onnxruntime_engine import OnnxRuntimeEngine
from engines.torch_engine import TorchEngine
from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import small_realtime


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_realtime(128), with_text_model=False).eval()


@pytest.fixture(scope="module")
def ort_engine(model, tmp_path_factory):
    # Shared with test_engines_cli.py (same seed, same weights): the graphs are exported once.
    cache = EngineCache(tmp_path_factory.getbasetemp() / "engine-cache-shared")
    return OnnxRuntimeEngine(model, cache, intra_op_threads=1)


def test_graphs_pass_checker_and_have_dynamic_prompt_axis(ort_engine):
    for graph, path in ort_engine.paths.items():
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        dims = {
            i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input
        }
        if graph == "encoder":
            assert dims == {"image": [1, 3, 128, 128]}
        else:
            assert dims["tokens"][0] == "K"
            assert dims["embedding"] == [1, 128, 16, 16]
    assert set(ort_engine.paths) == {"encoder", "decoder", "decoder_points"}


def test_onnxruntime_matches_pytorch_for_several_k(model, ort_engine):
    decoders = {g: p for g, p in ort_engine.paths.items() if g != "encoder"}
    reports = verify_with_onnxruntime(model, decoders, ks=(1, 4, 7), n_points=2)
    assert {r.graph for r in reports} == {"decoder", "decoder_points"}
    for r in reports:
        assert r.ok, r
        assert r.max_abs_logits <= LOGITS_ATOL
        assert r.max_abs_iou <= IOU_ATOL
        assert r.mask_agreement >= MASK_AGREEMENT_MIN


def test_engine_interface_matches_torch_engine(model, ort_engine):
    ref = TorchEngine(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, 3, 128, 128), generator=g)
    emb_t, emb_o = ref.encode_image(x), ort_engine.encode_image(x)
    assert emb_o.shape == emb_t.shape
    assert emb_o.dtype == torch.float32
    tok = torch.randn((6, 128), generator=g)
    coords = torch.rand((6, 3, 2), generator=g, dtype=torch.float64) * 127
    labels = torch.tensor([[1.0, 0.0, 1.0]] * 6, dtype=torch.float64)
    for args in ((tok,), (tok, coords, labels)):
        lt, it = ref.decode(emb_t, *args)
        lo, io = ort_engine.decode(emb_t, *args)
        p = compare_outputs("iface", str(len(args)), (lt.numpy(), it.numpy()), (lo.numpy(), io.numpy()))
        assert p.ok, p


def test_image_tokens_stay_batch_one_until_first_image_to_token_update(ort_engine, model):
    """The prompt-independent projections run once per frame, not once per prompt."""
    import onnxruntime as ort

    m = onnx.load(str(ort_engine.paths["decoder"]))
    watch = {
        "layers.0/cross_attn_token_to_image/k_proj": 1,  # image tokens, before any update
        "layers.0/cross_attn_image_to_token/q_proj": 1,
        "layers.1/cross_attn_token_to_image/k_proj": 5,  # after layer 0 updated them per prompt
    }
    names = {}
    for node in m.graph.node:
        for key in watch:
            if key in node.name and node.op_type == "Add":
                names[node.output[0]] = watch[key]
    assert len(names) == len(watch), names
    for out in names:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        "embedding": np.random.default_rng(0).random((1, 128, 16, 16), dtype=np.float32),
        "tokens": np.ones((5, 128), np.float32),
    }
    res = sess.run(list(names), feeds)
    for (out, batch), val in zip(names.items(), res):
        assert val.shape[0] == batch, (out, val.shape)


def test_cache_reuses_graphs_and_keys_them_by_weights(model, ort_engine, tmp_path):
    again = OnnxRuntimeEngine(model, ort_engine.cache, intra_op_threads=1)
    assert again.paths == ort_engine.paths  # no re-export
    other = build_model(small_realtime(128), with_text_model=False).eval()
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.add_(1.0)
    assert model_hash(other) != model_hash(model)
    # Weights off the frame path (text MLP) do not change the engine's identity.
    third = build_model(small_realtime(128), with_text_model=False).eval()
    third.load_state_dict(model.state_dict())
    with torch.no_grad():
        third.prompt_encoder.clip_mlp.layers[0].weight.add_(1.0)
    assert model_hash(third) == model_hash(model)


def test_onnx_image_encoder_matches_pytorch_numerically(model, ort_engine):
    """The exported image encoder against the PyTorch model, value by value (the decoder parity
    above feeds both sides the same embedding, so it cannot see an encoder export error). Input:
    a preprocessed 12-bit frame, as the node feeds it. Measured difference: ~2e-6 on an
    embedding of std ~1; the bound is 50x that, far below any error that would move a mask."""
    from fluorosam_rt.preprocess import Preprocessor

    pp = model.cfg.preprocess
    pre = Preprocessor(model.img_size, windowing=pp.windowing, window_at=pp.window_at)
    frame = np.random.default_rng(0).integers(0, 4096, (96, 128)).astype(np.uint16)
    x = pre(frame)[0].unsqueeze(0)
    with torch.no_grad():
        want = model.encode_image(x)
    got = ort_engine.encode_image(x)
    assert got.shape == want.shape
    assert float(want.std()) > 0.1  # a real embedding, not a constant one
    assert float((got - want).abs().max()) <= 1e-4
    # ... and the masks decoded from each embedding agree (same decoder, PyTorch).
    tok = torch.randn((3, model.cfg.prompt_encoder.embed_dim), generator=torch.Generator().manual_seed(5))
    ref = TorchEngine(model)
    lt, it = ref.decode(want, tok)
    lo, io = ref.decode(got, tok)
    p = compare_outputs("encoder", "decode", (lt.numpy(), it.numpy()), (lo.numpy(), io.numpy()))
    assert p.ok, p
