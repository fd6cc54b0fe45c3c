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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A small real-time model with random weights (seed 0) in the native format, saved the way
    training saves one; shared by every test that needs a runnable checkpoint."""
    import torch

    from fluorosam_rt.checkpoint import save_native
    from fluorosam_rt.model.build import build_model
    from fluorosam_rt.model.config import small_realtime
    from fluorosam_rt.text.minilm import MiniLMTextEncoder

    torch.manual_seed(0)  # test_engines_onnx.py uses the same weights, so the engine cache is reused
    model = build_model(small_realtime(128))
    enc = MiniLMTextEncoder()
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    save_native(model, path, {"kind": "minilm", "identity": enc.identity()}, {"presence_threshold": -1e9})
    return path


@pytest.fixture(scope="session")
def bundle(checkpoint):
    """The shared small checkpoint loaded with its text encoder, as the node loads a model."""
    from fluorosam_rt.bundle import load_bundle

    return load_bundle(checkpoint)
