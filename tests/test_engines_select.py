"""Back-end selection, fallback with reasons, and the torch-compiled engine on CPU."""

from __future__ import annotations

import pytest
import torch

from engines.base import EngineError
from engines.compiled_engine import TorchCompiledEngine, bucket_for
from engines.select import EngineSettings, auto_chain, candidate_chain, create_engine
from engines.torch_engine import TorchEngine
from fluorosam_rt.model.build import build_model
from fluorosam_rt.model.config import small_realtime


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_realtime(64), with_text_model=False).eval()


def test_chains():
    assert [n for n, _ in auto_chain(cuda=False)] == ["onnxruntime", "torch"]
    assert auto_chain(cuda=True)[0] == ("trt", "cuda")
    assert candidate_chain("torch", cuda=False, strict=True) == [("torch", "cpu")]
    assert candidate_chain("trt", cuda=False)[0] == ("trt", "cpu")
    assert candidate_chain("trt", cuda=False)[1:] == auto_chain(cuda=False)
    with pytest.raises(EngineError, match="unknown engine"):
        candidate_chain("tensorflow", cuda=False)


def test_fallback_logs_precise_reasons_and_reports_them(model, caplog):
    def builder(name, device, m, opts):
        if name == "onnxruntime":
            raise EngineError("onnxruntime is not installed (test)")
        return TorchEngine(m, device)

    with caplog.at_level("INFO", logger="engines.select"):
        eng = create_engine(EngineSettings("auto"), model, cuda=False, builder=builder)
    assert eng.name == "torch"
    info = eng.describe()
    assert info["skipped"] == ["onnxruntime (cpu): onnxruntime is not installed (test)"]
    assert info["reason"] == "fastest available"
    assert "onnxruntime is not installed (test)" in caplog.text
    assert "torch (cpu) chosen" in caplog.text


def test_explicit_trt_without_tensorrt_falls_back_or_fails_strictly(model):
    def builder(name, device, m, opts):
        if name == "torch":
            return TorchEngine(m, device)
        raise EngineError(f"{name} unavailable")

    eng = create_engine(EngineSettings("trt"), model, cuda=False, builder=builder)
    assert eng.name == "torch"
    assert eng.describe()["reason"] == "fallback for trt"
    with pytest.raises(EngineError, match="trt \\(cpu\\): trt unavailable"):
        create_engine(EngineSettings("trt", strict=True), model, cuda=False, builder=builder)


def test_real_trt_probe_reason_on_this_machine(model):
    from engines.tensorrt_engine import probe_tensorrt

    why = probe_tensorrt()
    if why is None:
        pytest.skip("TensorRT present")
    with pytest.raises(EngineError) as exc:
        create_engine(EngineSettings("trt", strict=True, device="cpu"), model)
    assert why in str(exc.value)


def test_bucket_for():
    assert [bucket_for(k, (1, 2, 4, 8)) for k in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0, (1, 2))


def test_compiled_engine_rejects_what_cpu_cannot_do(model):
    with pytest.raises(EngineError, match="needs a CUDA device"):
        TorchCompiledEngine(model, "cpu", precision="fp16", compile=False)
    with pytest.raises(EngineError, match="CUDA graphs need"):
        TorchCompiledEngine(model, "cpu", compile=False, cuda_graphs=True)
    with pytest.raises(EngineError, match="unknown precision"):
        TorchCompiledEngine(model, "cpu", precision="int4", compile=False)


def _check_against_torch(eng, model):
    ref = TorchEngine(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 3, 64, 64), generator=g)
    emb = ref.encode_image(x)
    torch.testing.assert_close(eng.encode_image(x), emb, atol=1e-5, rtol=1e-5)
    for k in (1, 3, 5):  # 3 and 5 are padded to buckets 4 and 8
        tok = torch.randn((k, model.cfg.prompt_encoder.embed_dim), generator=g)
        coords = torch.rand((k, 2, 2), generator=g, dtype=torch.float64) * 63
        labels = torch.tensor([[1.0, 0.0]] * k, dtype=torch.float64)
        for args in ((tok,), (tok, coords, labels)):
            lo, io = eng.decode(emb, *args)
            rl, ri = ref.decode(emb, *args)
            assert lo.shape == (k, 3, model.low_res_size, model.low_res_size)
            torch.testing.assert_close(lo, rl, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(io, ri, atol=1e-5, rtol=1e-4)


def test_padded_engine_matches_torch_and_leaves_callers_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eng = TorchCompiledEngine(model, "cpu", compile=False)
    _check_against_torch(eng, model)
    assert eng.describe()["k_buckets"] == [1, 2, 4, 8, 16, 32]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.slow
def test_torch_compile_engine_matches_torch_on_cpu(model):
    """Dynamo tracing with the eager backend (inductor codegen takes minutes on 2 cores)."""
    eng = TorchCompiledEngine(model, "cpu", compile=True, compile_backend="eager")
    _check_against_torch(eng, model)


def test_torch_compile_engine_matches_torch_on_cpu_for_one_bucket(model):
    """Cheap version of the slow test above for the default suite: dynamo traces the encoder and
    one padded decoder bucket (K = 3 -> 4). The backend records the graphs it is given, so the
    test also shows that dynamo really captured them rather than running the modules eagerly."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    eng = TorchCompiledEngine(model, "cpu", compile=True, compile_backend=recording)
    ref = TorchEngine(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn((1, 3, 64, 64), generator=g)
    emb = ref.encode_image(x)
    torch.testing.assert_close(eng.encode_image(x), emb, atol=1e-5, rtol=1e-5)
    tok = torch.randn((3, model.cfg.prompt_encoder.embed_dim), generator=g)
    lo, io = eng.decode(emb, tok)
    rl, ri = ref.decode(emb, tok)
    assert lo.shape == (3, 3, model.low_res_size, model.low_res_size)
    torch.testing.assert_close(lo, rl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(io, ri, atol=1e-5, rtol=1e-4)
    assert len(graphs) >= 2, "dynamo captured no graph for the encoder and the decoder"


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("precision", "graphs", "agree"), [("fp32", False, 0.999), ("fp16", True, 0.98), ("bf16", True, 0.97)]
)
def test_cuda_backends_match_cpu_pytorch(model, precision, graphs, agree):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    eng = TorchCompiledEngine(model, "cuda", precision=precision, compile=False, cuda_graphs=graphs)
    ref = TorchEngine(model)
    x = torch.randn(1, 3, 64, 64)
    emb = ref.encode_image(x)
    tok = torch.randn(3, model.cfg.prompt_encoder.embed_dim)
    rl, _ = ref.decode(emb, tok)
    for _ in range(2):  # second call replays the captured graph
        lo, _ = eng.decode(eng.encode_image(x), tok)
        assert float(((lo.cpu() > 0) == (rl > 0)).float().mean()) >= agree


class _Scripted(TorchEngine):
    """A real torch engine whose decode fails or returns NaN on the calls it is told to."""

    def __init__(self, model, name: str, script: str) -> None:
        super().__init__(model, "cpu")
        self.name, self.script, self.calls = name, script, 0

    def decode(self, *args, **kw):
        step = self.script[self.calls % len(self.script)]
        self.calls += 1
        if step == "x":
            raise RuntimeError("device lost (simulated)")
        logits, iou = super().decode(*args, **kw)
        return (logits * float("nan"), iou) if step == "n" else (logits, iou)


def test_chain_switches_after_failures_in_a_row_only(model):
    from engines.chain import EngineChain, EngineRunError, NonFiniteOutput

    emb = TorchEngine(model, "cpu").encode_image(torch.zeros(1, 3, model.img_size, model.img_size))
    tokens = torch.zeros(1, model.cfg.prompt_encoder.embed_dim)
    spare = _Scripted(model, "spare", "o")
    chain = EngineChain(_Scripted(model, "first", "xono"), [spare], max_consecutive_failures=2)
    for _ in range(2):  # failure, success, NaN, success: never two in a row
        with pytest.raises(EngineRunError, match="engine first: RuntimeError: device lost"):
            chain.decode(emb, tokens)
        chain.decode(emb, tokens)
        with pytest.raises(NonFiniteOutput, match="engine first"):
            chain.decode(emb, tokens)
        assert chain.consecutive_failures == 1
        chain.decode(emb, tokens)
        assert chain.consecutive_failures == 0
    assert chain.switches == []
    assert chain.name == "first"
    chain.active = _Scripted(model, "bad", "x")
    for _ in range(2):
        with pytest.raises(EngineRunError):
            chain.decode(emb, tokens)
    assert chain.active is spare
    reason = "RuntimeError: device lost (simulated)"
    assert chain.switches == [{"from": "bad", "to": "spare", "reason": reason}]
    assert torch.isfinite(chain.decode(emb, tokens)[0]).all()


def test_node_settings_check_engine_names_against_the_engine_list():
    from fluorosam_rt.service.node_config import NodeConfigError, load_settings

    for model in ({"engine": "tensorflow"}, {"fallback_engines": ["torch", "tensorflow"]}):
        with pytest.raises(NodeConfigError, match=r"tensorflow.*choose from auto, trt"):
            load_settings(None, {"source": {"kind": "replay", "path": "."}, "model": model})
    s = load_settings(None, {"source": {"kind": "replay", "path": "."}, "model": {"engine": "onnxruntime"}})
    assert s.model.engine_settings().engine == "onnxruntime"
