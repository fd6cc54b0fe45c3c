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
