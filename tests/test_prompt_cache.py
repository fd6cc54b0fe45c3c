"""The prompt cache: normalised keys, counted encodes, disk persistence keyed by identity."""

from __future__ import annotations

import pytest
import torch

from fluorosam_rt.prompts import (
    MAX_PROMPT_CHARS,
    Prompt,
    PromptCache,
    PromptError,
    PromptNotCachedError,
    normalize_prompt,
)


class CountingTokens:
    """A token function that records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([torch.full((4,), float(sum(map(ord, t)))) for t in texts])


def test_normalisation_shares_entries():
    assert normalize_prompt("  Left   Femur ") == "left femur"
    cache = PromptCache("id")
    fn = CountingTokens()
    a = cache.encode(["Left femur", "left  FEMUR", "heart"], fn)
    assert fn.calls == [["heart", "left femur"]]
    assert cache.encode_count == 2
    assert torch.equal(a[0], a[1])
    cache.encode(["HEART"], fn)
    assert cache.encode_count == 2
    assert len(fn.calls) == 1


def test_lookup_never_encodes():
    cache = PromptCache("id")
    with pytest.raises(PromptNotCachedError):
        cache.lookup(["spine"])
    cache.encode(["spine"], CountingTokens())
    assert cache.lookup(["Spine"]).shape == (1, 4)
    assert cache.encode_count == 1


@pytest.mark.parametrize("bad", ["", "   ", "x" * (MAX_PROMPT_CHARS + 1)])
def test_bad_prompts_rejected(bad):
    with pytest.raises(PromptError):
        normalize_prompt(bad)
    with pytest.raises(PromptError):
        Prompt(bad)


def test_prompt_points_validated():
    assert Prompt("lungs", ((1.0, 2.0),), (1,)).id == "lungs"
    with pytest.raises(PromptError, match="labels"):
        Prompt("lungs", ((1.0, 2.0),), ())
    with pytest.raises(PromptError, match="label"):
        Prompt("lungs", ((1.0, 2.0),), (2,))


def test_persisted_and_keyed_by_identity(tmp_path):
    fn = CountingTokens()
    first = PromptCache("model-a", tmp_path)
    tokens = first.encode(["lungs", "heart"], fn)
    assert first.path is not None
    assert first.path.is_file()

    again = PromptCache("model-a", tmp_path)
    assert again.texts() == ["heart", "lungs"]
    assert torch.equal(again.lookup(["lungs", "heart"]), tokens)
    assert again.encode_count == 0

    other = PromptCache("model-b", tmp_path)
    assert len(other) == 0


def test_damaged_cache_file_is_rebuilt(tmp_path):
    cache = PromptCache("model-a", tmp_path)
    cache.encode(["lungs"], CountingTokens())
    cache.path.write_bytes(b"garbage")
    fresh = PromptCache("model-a", tmp_path)
    assert len(fresh) == 0
    fresh.encode(["lungs"], CountingTokens())
    assert PromptCache("model-a", tmp_path).texts() == ["lungs"]


def test_warm_list_from_yaml(tmp_path):
    from fluorosam_rt.bundle import ASSETS_DIR
    from fluorosam_rt.prompts import prompt_texts_from_yaml

    f = tmp_path / "p.yaml"
    f.write_text("prompts: [lungs, Lungs, heart]\n")
    assert prompt_texts_from_yaml(f) == ["lungs", "heart"]
    vocab = ASSETS_DIR.parents[1] / "configs" / "vocabulary.yaml"
    texts = [normalize_prompt(t) for t in prompt_texts_from_yaml(vocab)]
    assert {"lungs", "left lung", "heart", "k-wire", "left collarbone"} <= set(texts)
    assert len(texts) == len(set(texts))
    f.write_text("something: else\n")
    with pytest.raises(PromptError, match="no prompts"):
        prompt_texts_from_yaml(f)


def test_seed_folder_preloads_without_encoding_and_stays_read_only(tmp_path):
    shipped = tmp_path / "shipped"
    PromptCache("model-a", directory=shipped).encode(["lungs", "heart"], CountingTokens())
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    fn = CountingTokens()
    cache = PromptCache("model-a", seed=shipped)
    assert cache.seeded_count == 2
    cache.encode(["Lungs", "spine"], fn)
    assert fn.calls == [["spine"]]  # only the prompt that was not shipped is encoded
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before  # the seed is never written
    assert PromptCache("model-b", seed=shipped).seeded_count == 0  # another model's tokens are ignored


def test_default_model_ships_its_own_vocabulary_tokens():
    from fluorosam_rt.bundle import DEFAULT_MODEL_PATH, load_bundle
    from fluorosam_rt.predictor import Predictor

    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip("no embedded default model installed")
    bundle = load_bundle()
    seeded = bundle.prompt_cache()
    assert seeded.seeded_count > 100
    fresh = Predictor(bundle.model, bundle.text_encoder)  # its own, empty cache
    texts = ["lungs", "left lung", "K-wire", "pedicle screw", "left collarbone"]
    fresh.add_prompts(texts)
    assert fresh.cache.encode_count == len(texts)
    # The shipped tokens are the ones the shipped weights and text encoder produce.
    assert torch.allclose(seeded.lookup(texts), fresh.cache.lookup(texts), atol=1e-5)
    assert seeded.encode_count == 0
