"""Which prompts name a linear tool, read from the vocabulary (configs/vocabulary.yaml).

A tool entry with ``linear: rigid`` (K-wire, drill bit, screws) or ``linear: flexible``
(guidewire, catheter) gets a centre line, tip and axis (tool_axis.py). A prompt is resolved to its
entry through every phrasing the vocabulary knows (fluorosam_rt/phrasings.py: "K-wire",
"Kirschner wire", "K-wires", "kirshner wire", ...), so the decision follows the vocabulary and is
never a list of strings in the node. A prompt that matches no entry is not a tool: outlines and
instances only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .phrasings import expand_vocabulary
from .text.base import normalize_prompt

log = logging.getLogger(__name__)

DEFAULT_VOCABULARY = Path(__file__).resolve().parents[1] / "configs" / "vocabulary.yaml"
KINDS = ("rigid", "flexible")


class LinearTools:
    """Normalised prompt text -> 'rigid' | 'flexible' for the vocabulary's linear tools."""

    def __init__(self, kinds: Mapping[str, str], source: str = "") -> None:
        self._kinds = dict(kinds)
        self.source = source

    @classmethod
    def from_vocabulary(cls, doc: Mapping[str, Any], source: str = "") -> LinearTools:
        kinds: dict[str, str] = {}
        expanded = expand_vocabulary(doc)
        for entry in doc.get("tools") or ():
            kind = entry.get("linear")
            if kind is None:
                continue
            if kind not in KINDS:
                raise ValueError(
                    f"{source or 'vocabulary'}: tool {entry.get('name')!r} has linear: {kind!r}; use {KINDS}"
                )
            ex = expanded[str(entry["name"])]
            for text in (ex.prompt, *(p.text for p in ex.phrasings)):
                kinds[normalize_prompt(text)] = kind
        return cls(kinds, source)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LinearTools:
        """From a vocabulary file (default: the project's); none at all when it cannot be read."""
        import yaml

        p = Path(path) if path is not None else DEFAULT_VOCABULARY
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if path is not None:
                raise ValueError(f"cannot read the vocabulary {p}: {exc}") from exc
            log.warning("no vocabulary at %s (%s): no prompt gets tool tips and axes", p, exc)
            return cls({}, "")
        return cls.from_vocabulary(doc, str(p))

    def kind(self, prompt_text: str) -> str | None:
        try:
            return self._kinds.get(normalize_prompt(prompt_text))
        except (TypeError, ValueError):
            return None

    def __len__(self) -> int:
        return len(self._kinds)


@functools.lru_cache(maxsize=1)
def default_linear_tools() -> LinearTools:
    """The project vocabulary's linear tools, loaded once per process (expanding phrasings takes ~0.4 s)."""
    return LinearTools.load()
