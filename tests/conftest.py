"""Shared fixtures. Tests that need ../shared fail loudly when it is missing, never skip."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"required shared data is missing: {path}. Tests read ../shared relative to the repository root "
            "(see the README's 'Shared data' section).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require(SHARED_DIR / "golden")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(SHARED_DIR / "reference")


@pytest.fixture(scope="session")
def golden_state_dict(golden_dir: Path) -> dict:
    import torch

    ckpt = torch.load(golden_dir / "golden_checkpoint.pt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.fixture(scope="session")
def golden_io(golden_dir: Path) -> dict:
    import torch

    return torch.load(golden_dir / "golden_io.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def golden_debug(golden_dir: Path) -> dict:
    import torch

    return torch.load(golden_dir / "golden_debug.pt", map_location="cpu", weights_only=True)


# The prompts the multi-prompt tests use. Each must get its own prompt token and its own mask in
# the shared checkpoint, or a test could not tell prompts swapped or published in the wrong order.
DISTINCT_PROMPTS = ("lungs", "heart", "spine", "left lung", "right lung", "guidewire tip", "K-wire")


def _spread_codebook(model, text_encoder) -> None:
    """Give each of DISTINCT_PROMPTS its own token, far apart, as training gives each structure one.

    With random weights the prompt MLP's output is dominated by its bias and VQ snaps every prompt
    to one codeword (measured: 9 of 11 test prompts on the same token), so every prompt decoded to
    the same mask. Here the MLP's last layer is solved (least squares, exact for these few
    prompts) to map each prompt to its own random target of trained-token size, and that target
    is written into its own codeword, so VQ snaps it there exactly. Tokens of norm ~0.4 barely
    move the random decoder's masks (0.2% of pixels apart); these (norm ~17) move them by a few
    percent. The image path and the decoder keep their seed-0 weights, so the engine cache shared
    with tests/test_engines_onnx.py stays valid (its key leaves out the MLP and the codebook).
    """
    import torch

    pe = model.prompt_encoder
    mlp = pe.clip_mlp
    n = len(DISTINCT_PROMPTS)
    targets = torch.randn((n, mlp.layers[-1].out_features), generator=torch.Generator().manual_seed(19)) * 1.5
    with torch.no_grad():
        hidden = text_encoder.encode(list(DISTINCT_PROMPTS)).to(mlp.layers[0].weight.dtype)
        for layer in mlp.layers[:-1]:
            hidden = mlp.act(layer(hidden))
        mlp.layers[-1].weight.copy_((torch.linalg.pinv(hidden) @ targets).T)
        mlp.layers[-1].bias.zero_()
        pe.vq._codebook.embed[0, :n] = mlp(text_encoder.encode(list(DISTINCT_PROMPTS)))


def assert_prompts_distinct(model, text_encoder) -> None:
    """Fail the fixture unless every one of DISTINCT_PROMPTS has its own token and, on a random
    image, its own mask: a swap of any two must show in a per-prompt comparison."""
    import numpy as np
    import torch

    from fluorosam_rt.predictor import Predictor

    with torch.no_grad():
        tokens = model.text_tokens(text_encoder.encode(list(DISTINCT_PROMPTS)))
    n = len(DISTINCT_PROMPTS)
    same = [(a, b) for a in range(n) for b in range(a + 1, n) if torch.equal(tokens[a], tokens[b])]
    assert not same, f"prompts share a token: {[(DISTINCT_PROMPTS[a], DISTINCT_PROMPTS[b]) for a, b in same]}"
    pred = Predictor(model, text_encoder, presence_threshold=-1e9)
    pred.set_image(np.random.default_rng(0).integers(0, 255, (96, 128), np.uint8))
    res = pred.predict(list(DISTINCT_PROMPTS))
    for a in range(n):
        for b in range(a + 1, n):
            differ = float(np.mean(res[a].mask != res[b].mask))
            assert differ > 0.01, (
                f"{DISTINCT_PROMPTS[a]!r} and {DISTINCT_PROMPTS[b]!r} masks differ by {differ}"
            )
            assert abs(res[a].score - res[b].score) > 1e-3, (DISTINCT_PROMPTS[a], DISTINCT_PROMPTS[b])


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A small real-time model with random weights (seed 0) in the native format, saved the way
    training saves one; shared by every test that needs a runnable checkpoint. Its codebook gives
    each of DISTINCT_PROMPTS its own token and mask (asserted here)."""
    import torch

    from fluorosam_rt.checkpoint import save_native
    from fluorosam_rt.model.build import build_model
    from fluorosam_rt.model.config import small_realtime
    from fluorosam_rt.text.minilm import MiniLMTextEncoder

    torch.manual_seed(0)  # test_engines_onnx.py uses the same weights, so the engine cache is reused
    model = build_model(small_realtime(128)).eval()
    enc = MiniLMTextEncoder()
    _spread_codebook(model, enc)
    assert_prompts_distinct(model, enc)
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_native(model, path, {"kind": "minilm", "identity": enc.identity()}, {"presence_threshold": -1e9})
    return path


@pytest.fixture(scope="session")
def bundle(checkpoint):
    """The shared small checkpoint loaded with its text encoder, as the node loads a model."""
    from fluorosam_rt.bundle import load_bundle

    return load_bundle(checkpoint)
