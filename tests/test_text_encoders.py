"""Text encoders: CLIP tokenizer and tower against the golden fixture, MiniLM against known values."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fluorosam_rt.model.config import TextConfig, golden_reduced
from fluorosam_rt.text import (
    ClipTextEncoder,
    ClipTextModel,
    ClipTokenizer,
    MiniLMTextEncoder,
    TextEncoder,
    build_text_encoder,
    default_minilm_dir,
    load_clip_text_weights,
    normalize_prompt,
)

GOLDEN_PREFIX = "sam.prompt_encoder.text_model."
CASES = ("text0", "text1", "text2")
ATOL = 5e-5
# Tensors that OpenAI's convert_weights turns to fp16 (golden README: their values are fp16-exact).
FP16_SUFFIXES = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
    "text_projection",
    "visual.proj",
    "visual.conv1.weight",
)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def text_cfg() -> TextConfig:
    return golden_reduced().text


@pytest.fixture(scope="module")
def golden_text_state(golden_state_dict: dict) -> dict[str, torch.Tensor]:
    """The text tower slice of the golden checkpoint, without prefix (OpenAI CLIP layout)."""
    return {k[len(GOLDEN_PREFIX) :]: v for k, v in golden_state_dict.items() if k.startswith(GOLDEN_PREFIX)}


@pytest.fixture(scope="module")
def golden_clip(golden_state_dict: dict, text_cfg: TextConfig, tokenizer: ClipTokenizer) -> ClipTextEncoder:
    return ClipTextEncoder(load_clip_text_weights(golden_state_dict, text_cfg), tokenizer)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def _golden_features(golden_io: dict) -> torch.Tensor:
    return torch.cat([golden_io[f"{n}/clip_text_feature"] for n in CASES])


def _assert_golden(model: ClipTextModel, golden_io: dict) -> None:
    tokens = torch.cat([golden_io[f"{n}/tokens"] for n in CASES])
    with torch.no_grad():
        out = model(tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _golden_features(golden_io), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# normalize_prompt


def test_normalize_prompt_folds_case_space_and_unicode_forms() -> None:
    assert normalize_prompt("  Left \t FEMUR\n") == "left femur"
    decomposed = "Cafe\u0301"  # e + combining acute
    assert normalize_prompt(decomposed) == normalize_prompt("caf\u00e9") == "caf\u00e9"
    assert normalize_prompt("lumbar  vertebra L3") == "lumbar vertebra l3"


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_normalize_prompt_rejects_empty(bad: str) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        normalize_prompt(bad)


# ----------------------------------------------------------------------------------------------
# CLIP tokenizer


def test_tokenizer_left_femur(tokenizer: ClipTokenizer) -> None:
    tokens = tokenizer.tokenize(["left femur"])
    assert tokens.dtype == torch.long
    assert tokens.shape == (1, 77)
    assert tokens[0, :6].tolist() == [49406, 1823, 623, 18293, 49407, 0]
    assert int(tokens[0, 5:].abs().sum()) == 0


@pytest.mark.parametrize("name", CASES)
def test_tokenizer_matches_golden(tokenizer: ClipTokenizer, golden_io: dict, name: str) -> None:
    assert torch.equal(tokenizer.tokenize(golden_io[f"{name}/prompt"]), golden_io[f"{name}/tokens"])


def test_tokenizer_vocabulary_layout(tokenizer: ClipTokenizer) -> None:
    # Byte symbols come first in printable-then-remaining order: "!" is 0, "a</w>" is 256 + 64.
    assert tokenizer.vocab_size == 49408
    assert tokenizer.encoder["!"] == 0
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_tokenizer_cleanup_and_roundtrip(tokenizer: ClipTokenizer) -> None:
    # html is unescaped twice, whitespace collapsed, case folded
    assert tokenizer.encode("Left &amp;amp;  FEMUR") == tokenizer.encode("left & femur")
    # digits are single pre-tokens, so "L3" splits; non-ASCII goes through the byte map and back
    assert tokenizer.decode(tokenizer.tokenize("lumbar vertebra L3")[0]) == "lumbar vertebra l 3"
    assert tokenizer.decode(tokenizer.encode("Über naïve café 😀")) == "über naïve café 😀"
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis"
    assert tokenizer.decode(tokenizer.encode(long_word)) == long_word


def test_tokenizer_rejects_overlong_prompt(tokenizer: ClipTokenizer) -> None:
    exactly_full = " ".join(["lung"] * 75)  # 75 + SOT + EOT = 77
    assert tokenizer.tokenize(exactly_full)[0, -1].item() == 49407
    with pytest.raises(ValueError, match="context length 77"):
        tokenizer.tokenize(exactly_full + " lung")


def test_tokenizer_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ClipTokenizer(tmp_path / "nope.txt.gz")


# ----------------------------------------------------------------------------------------------
# CLIP text tower


def test_clip_key_layout_is_exactly_the_checkpoints(golden_text_state: dict, text_cfg: TextConfig) -> None:
    model = ClipTextModel(text_cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in golden_text_state.items()}
    model.load_state_dict(golden_text_state, strict=True)
    no_visual = ClipTextModel(dataclasses.replace(text_cfg, keep_visual_remnants=False))
    assert not any(k.startswith("visual.") for k in no_visual.state_dict())


def test_clip_golden_features(golden_clip: ClipTextEncoder, golden_io: dict) -> None:
    _assert_golden(golden_clip.model, golden_io)
    # the encoder path (own tokenizer, batched, padding trimmed) must give the same numbers
    out = golden_clip.encode([golden_io[f"{n}/prompt"] for n in CASES])
    assert out.shape == (3, 512)
    assert out.dtype == torch.float32
    assert not out.requires_grad
    torch.testing.assert_close(out, _golden_features(golden_io), atol=ATOL, rtol=0)
    single = golden_clip.encode([golden_io["text2/prompt"]])
    torch.testing.assert_close(single[0], out[2], atol=1e-6, rtol=0)


def test_clip_is_causal_and_reads_eot(golden_clip: ClipTextEncoder, golden_io: dict) -> None:
    tokens = golden_io["text0/tokens"].clone()
    eot = int(tokens.argmax())
    with torch.no_grad():
        ref = golden_clip.model(tokens)
        after = tokens.clone()
        after[0, eot + 1 :] = 500  # anything after the EOT must be invisible
        torch.testing.assert_close(golden_clip.model(after), ref, atol=1e-6, rtol=0)
        before = tokens.clone()
        before[0, 1] = 500  # but a token before it must matter
        assert (golden_clip.model(before) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("prefix", ["sam.prompt_encoder.text_model.", "prompt_encoder.text_model.", ""])
def test_clip_loader_prefixes(
    golden_text_state: dict, text_cfg: TextConfig, golden_io: dict, prefix: str
) -> None:
    state = {prefix + k: v for k, v in golden_text_state.items()}
    state["sam.image_encoder.unrelated.weight"] = torch.zeros(3)  # other parts of a full checkpoint
    state[prefix + "visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    model = load_clip_text_weights(state, text_cfg)
    assert not model.training
    _assert_golden(model, golden_io)


def test_clip_loader_file_with_lightning_wrapper(
    golden_dir: Path, text_cfg: TextConfig, golden_io: dict
) -> None:
    _assert_golden(load_clip_text_weights(golden_dir / "golden_checkpoint.pt", text_cfg), golden_io)


def test_clip_loader_fp16_file(
    golden_text_state: dict, text_cfg: TextConfig, golden_io: dict, tmp_path: Path
) -> None:
    half = {
        "prompt_encoder.text_model." + k: (v.half() if k.endswith(FP16_SUFFIXES) else v)
        for k, v in golden_text_state.items()
    }
    assert sum(v.dtype == torch.float16 for v in half.values()) == 2 * 8 + 3
    path = tmp_path / "fp16.ckpt"
    torch.save({"state_dict": half, "epoch": 3}, path)
    model = load_clip_text_weights(path, text_cfg)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    _assert_golden(model, golden_io)


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _scripted_from_state(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose state_dict is `state`, standing in for OpenAI's ViT-B-32.pt."""
    root = _Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, _Holder())
            mod = getattr(mod, part)
        if value.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            mod.register_buffer(leaf, value.clone())
    return torch.jit.script(root)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_clip_loader_torchscript(
    golden_text_state: dict, text_cfg: TextConfig, golden_io: dict, tmp_path: Path
) -> None:
    state = dict(golden_text_state)
    state["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(6, 2)
    state["input_resolution"] = torch.tensor(224)
    state["context_length"] = torch.tensor(77)
    state["vocab_size"] = torch.tensor(49408)
    path = tmp_path / "ViT-tiny.pt"
    _scripted_from_state(state).save(str(path))
    _assert_golden(load_clip_text_weights(path, text_cfg), golden_io)


def test_clip_loader_errors(golden_text_state: dict, text_cfg: TextConfig) -> None:
    missing = {k: v for k, v in golden_text_state.items() if k != "ln_final.bias"}
    with pytest.raises(ValueError, match=r"missing: \['ln_final.bias'\]"):
        load_clip_text_weights(missing, text_cfg)
    with pytest.raises(ValueError, match=r"mis-shaped: .*text_projection: file \(64, 512\)"):
        load_clip_text_weights(golden_text_state, dataclasses.replace(text_cfg, feature_dim=256))
    with pytest.raises(ValueError, match=r"unexpected: .*transformer\.resblocks\.1\.attn"):
        load_clip_text_weights(golden_text_state, dataclasses.replace(text_cfg, layers=1))
    with pytest.raises(ValueError, match="no CLIP text tower"):
        load_clip_text_weights({"image_encoder.x": torch.zeros(1)}, text_cfg)
    with pytest.raises(FileNotFoundError):
        load_clip_text_weights(Path("/nonexistent/ViT-B-32.pt"), text_cfg)


def test_clip_identity(golden_clip: ClipTextEncoder, golden_state_dict: dict, text_cfg: TextConfig) -> None:
    ident = golden_clip.identity()
    assert len(ident) == 64
    assert int(ident, 16) >= 0
    assert golden_clip.identity() == ident
    other = ClipTextEncoder(load_clip_text_weights(golden_state_dict, text_cfg), golden_clip.tokenizer)
    assert other.identity() == ident  # same files -> same key, across instances
    with torch.no_grad():
        other.model.ln_final.bias[0] += 0.5
    changed = other.identity()
    assert changed != ident
    other.model.load_state_dict(golden_clip.model.state_dict())
    assert other.identity() == ident
    other.model.ln_final.bias.data[0] += 0.5  # bypasses the version counter: needs an explicit reset
    other.invalidate_identity()
    assert other.identity() == changed


# ----------------------------------------------------------------------------------------------
# build_text_encoder


def test_build_clip(golden_dir: Path, text_cfg: TextConfig, golden_io: dict) -> None:
    with pytest.raises(ValueError, match="random_init"):
        build_text_encoder(text_cfg)
    enc = build_text_encoder(text_cfg, golden_dir / "golden_checkpoint.pt")
    assert isinstance(enc, TextEncoder)
    assert (enc.kind, enc.feature_dim) == ("clip", 512)
    torch.testing.assert_close(enc.encode([golden_io["text1/prompt"]]), golden_io["text1/clip_text_feature"])
    enc.train()
    enc.encode(["left femur"])
    assert enc.training  # encode runs in eval mode but restores the caller's mode
    rnd = build_text_encoder(text_cfg, random_init=True)
    assert not rnd.training  # built in eval mode
    out = rnd.encode(["left femur", "the lungs"])
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()
    assert rnd.identity() != enc.identity()


def test_build_minilm(minilm: MiniLMTextEncoder) -> None:
    enc = build_text_encoder(TextConfig(kind="minilm", feature_dim=384))
    assert (enc.kind, enc.feature_dim) == ("minilm", 384)
    assert enc.identity() == minilm.identity()
    with pytest.raises(ValueError, match="feature_dim"):
        build_text_encoder(TextConfig(kind="minilm"))  # default 512 is CLIP's width


# ----------------------------------------------------------------------------------------------
# MiniLM


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_minilm_reference_similarities(minilm: MiniLMTextEncoder) -> None:
    f = minilm.encode(["left lung", "the patient's left lung", "heart"])
    assert f.shape == (3, 384)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert _cos(f[0], f[1]) == pytest.approx(0.885, abs=0.005)
    assert _cos(f[0], f[2]) == pytest.approx(0.289, abs=0.005)


def test_minilm_batch_matches_single(minilm: MiniLMTextEncoder) -> None:
    texts = ["heart", "the left lower lobe of the lung", "L3", "right femoral head and neck, AP view"]
    batch = minilm.encode(texts)
    singles = torch.cat([minilm.encode([t]) for t in texts])
    torch.testing.assert_close(batch, singles, atol=1e-5, rtol=0)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_truncates_long_prompts(minilm: MiniLMTextEncoder) -> None:
    long = " ".join(["vertebra"] * 600)
    out = minilm.encode([long, long + " heart"])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1])  # the tail beyond max_length is cut


def test_minilm_identity() -> None:
    enc = MiniLMTextEncoder()
    ident = enc.identity()
    assert enc.identity() == ident
    with torch.no_grad():
        enc.bert.encoder.layer[3].output.dense.weight[0, 0] += 1e-3
    assert enc.identity() != ident


def test_minilm_batch_of_100_is_fast(minilm: MiniLMTextEncoder) -> None:
    """One batch of 100 prompts costs less than half of 100 one-prompt calls (measured under
    load: 0.03-0.07 of it). A ratio on the same machine at the same moment, not a wall-clock
    bound: padding every prompt to the model's 512-token limit, say, would break it."""
    texts = [f"structure {i}: the left lung apex and the {i}th rib" for i in range(100)]
    minilm.encode(texts[:2])  # warm
    start = time.perf_counter()
    for t in texts[:5]:
        minilm.encode([t])
    per_prompt = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    out = minilm.encode(texts)
    batched = time.perf_counter() - start
    assert out.shape == (100, 384)
    assert batched < 0.5 * 100 * per_prompt, (batched, per_prompt)


def test_minilm_matches_transformers_bert(minilm: MiniLMTextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    model_dir = default_minilm_dir()
    config = transformers.BertConfig.from_json_file(str(model_dir / "config.json"))
    ref = transformers.BertModel(config, add_pooling_layer=False).eval()
    weights = {
        k: v for k, v in load_file(str(model_dir / "model.safetensors")).items() if not k.startswith("pooler")
    }
    ref.load_state_dict(weights, strict=False)
    texts = ["left lung", "the patient's left lung", "lumbar vertebra L3 and the sacrum"]
    batch = minilm.tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    with torch.no_grad():
        hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(minilm.bert(ids, mask), hidden, atol=1e-4, rtol=0)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = torch.nn.functional.normalize(pooled, dim=1)
    torch.testing.assert_close(minilm.encode(texts), expected, atol=1e-5, rtol=0)


def test_encode_input_contract(golden_clip: ClipTextEncoder) -> None:
    with pytest.raises(TypeError, match="list of prompts"):
        golden_clip.encode("left femur")  # a bare str would otherwise be iterated per character
    with pytest.raises(TypeError):
        golden_clip.encode([3])
    assert golden_clip.encode([]).shape == (0, 512)
    with pytest.raises(TypeError):
        TextEncoder()  # abstract
