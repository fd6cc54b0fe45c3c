"""The one engine the predictor runs: a chosen back end plus the ones to fall back to at run time.

Choice at load (``engines.select.create_engine``) and fallback at run time are both here, so
nothing else swaps back ends or counts their failures: the node only reads what the chain reports.
A call that raises, or a decode that returns NaN or Inf, counts as one failure and is re-raised
(``EngineRunError`` / ``NonFiniteOutput``) for the caller to drop that frame; a decode that
succeeds resets the count. After ``max_consecutive_failures`` failures in a row the next fallback
becomes the active back end, and the switch is recorded with its reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Engine, EngineError

log = logging.getLogger("engines.chain")


class EngineRunError(EngineError):
    """The active back end raised on a frame-path call; the message names back end and cause."""


class NonFiniteOutput(EngineError):
    """The active back end returned NaN or Inf logits or scores."""


@dataclass
class Loaded:
    """A back end that loaded, and how it was chosen (reported on the node's status)."""

    engine: Engine
    selection: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {**self.engine.describe(), **self.selection}


class EngineChain(Engine):
    """The active back end and, in order, the loaded back ends to switch to after repeated failures.

    ``active``: the back end that runs now (an ``Engine``, or a ``Loaded`` carrying how it was
    chosen). ``fallbacks``: the ones that take over, in order, each after
    ``max_consecutive_failures`` failures in a row of the one before it.
    """

    def __init__(
        self,
        active: Engine | Loaded,
        fallbacks: Sequence[Engine | Loaded] = (),
        max_consecutive_failures: int = 5,
    ) -> None:
        if max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be at least 1")
        self._active = active if isinstance(active, Loaded) else Loaded(active)
        self.fallbacks = [f if isinstance(f, Loaded) else Loaded(f) for f in fallbacks]
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.switches: list[dict[str, Any]] = []

    # -- what runs now ----------------------------------------------------------------------
    @property
    def active(self) -> Engine:
        return self._active.engine

    @active.setter
    def active(self, engine: Engine) -> None:
        """Replace the running back end (tests wrap it to simulate a device going bad)."""
        self._active = Loaded(engine, self._active.selection)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.active.name

    @property
    def dims(self):  # type: ignore[override]
        return self.active.dims

    # -- the frame path ---------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.active.encode_image(x)
        except Exception as exc:
            raise self._failed(f"{type(exc).__name__}: {exc}", EngineRunError) from exc

    def decode(
        self,
        embedding: torch.Tensor,
        tokens: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            logits, iou = self.active.decode(embedding, tokens, point_coords, point_labels)
        except Exception as exc:
            raise self._failed(f"{type(exc).__name__}: {exc}", EngineRunError) from exc
        if not (torch.isfinite(logits).all() and torch.isfinite(iou).all()):
            raise self._failed("engine returned NaN or Inf", NonFiniteOutput)
        self.consecutive_failures = 0
        return logits, iou

    def _failed(self, detail: str, kind: type[EngineError]) -> EngineError:
        """Count one failure, switch after too many in a row; the error to raise names the back end."""
        failed = self.active.name
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures and self.fallbacks:
            self._active = self.fallbacks.pop(0)
            self.consecutive_failures = 0
            self.switches.append({"from": failed, "to": self.active.name, "reason": detail})
            log.warning("engine %s failed repeatedly; switched to %s", failed, self.active.name)
        return kind(f"engine {failed}: {detail}")

    def describe(self) -> dict[str, Any]:
        return self._active.describe()
