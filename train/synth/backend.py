"""Render backends behind one interface: camera + tools + physics -> (image, projection with every mask).

The default ``torch`` backend is our projector plus ``physics.form_image``. ``deepdrr`` (optional, CUDA) swaps
in deepdrr's ray caster for the anatomy's attenuation and keeps our projector for the masks, so the masks and
annotations of both backends come from the same code and stay comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from train.synth.geometry import Camera
from train.synth.physics import PhysicsParams, form_image
from train.synth.projector import Projection, Projector, RayTool
from train.synth.volume import PreparedVolume

BACKENDS = ("torch", "deepdrr")


class RenderBackend(Protocol):
    """What ``generate.Renderer`` needs from a backend."""

    name: str
    projector: Projector  # ours, always: it makes the masks

    def render(
        self,
        cam: Camera,
        tools: Sequence[RayTool],
        phys: PhysicsParams,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Projection]: ...


class TorchBackend:
    """Our slice projector and physics model; runs on CPU and CUDA."""

    name = "torch"

    def __init__(self, vol: PreparedVolume, device: torch.device | str | None = None):
        self.projector = Projector(vol, device=device)

    def render(
        self,
        cam: Camera,
        tools: Sequence[RayTool],
        phys: PhysicsParams,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, Projection]:
        proj = self.projector.project(cam, tools)
        return form_image(proj.line_integrals, phys, generator=generator), proj


def make_backend(name: str, vol: PreparedVolume, device: torch.device | str | None = None) -> RenderBackend:
    """Backend by name; ``deepdrr`` is imported only here, only when asked for."""
    if name == "torch":
        return TorchBackend(vol, device)
    if name == "deepdrr":
        from train.synth.deepdrr_backend import DeepDRRBackend

        return DeepDRRBackend(vol, device=device)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
