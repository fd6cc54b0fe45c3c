"""The set of prompts the node segments on every frame, changed at run time by the control socket.

Changes are copy-on-write: the frame path takes one immutable snapshot per frame without a
lock, so a prompt added mid-frame is used from the next frame on and never half-applied. Text
is encoded here, on the caller's (control) thread, before the prompt becomes visible, so the
frame path only ever looks tokens up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .prompts import Prompt, PromptError

Encoder = Callable[[Sequence[str]], None]


class PromptLimitError(PromptError):
    """More prompts than the node is configured to decode per frame."""


class ActivePrompts:
    def __init__(self, encode: Encoder, max_prompts: int = 16) -> None:
        self._encode = encode
        self.max_prompts = max_prompts
        self._snapshot: tuple[Prompt, ...] = ()
        self._lock = threading.Lock()
        self.version = 0

    def snapshot(self) -> tuple[Prompt, ...]:
        return self._snapshot

    def _commit(self, prompts: list[Prompt]) -> tuple[Prompt, ...]:
        ids = [p.id for p in prompts]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise PromptError(f"duplicate prompt ids: {dup}")
        if len(prompts) > self.max_prompts:
            raise PromptLimitError(f"{len(prompts)} prompts; the node decodes at most {self.max_prompts}")
        self._encode([p.text for p in prompts])  # may raise; nothing is visible yet
        self._snapshot = tuple(prompts)
        self.version += 1
        return self._snapshot

    def add(self, new: Sequence[Prompt]) -> tuple[Prompt, ...]:
        """Add prompts; one whose id exists replaces it in place (same position)."""
        with self._lock:
            current = list(self._snapshot)
            index = {p.id: i for i, p in enumerate(current)}
            for p in new:
                if p.id in index:
                    current[index[p.id]] = p
                else:
                    index[p.id] = len(current)
                    current.append(p)
            return self._commit(current)

    def remove(self, ids: Sequence[str]) -> tuple[Prompt, ...]:
        with self._lock:
            known = {p.id for p in self._snapshot}
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise PromptError(f"no active prompt with id {unknown}")
            return self._commit([p for p in self._snapshot if p.id not in set(ids)])

    def set(self, prompts: Sequence[Prompt]) -> tuple[Prompt, ...]:
        with self._lock:
            return self._commit(list(prompts))
