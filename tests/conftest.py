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
