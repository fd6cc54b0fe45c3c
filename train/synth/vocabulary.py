"""The prompt vocabulary (configs/vocabulary.yaml): structures, hierarchical groups and tools.

One file serves the data engine and the node's prompt cache, so ids and canonical prompts cannot drift apart.
Each entry's hand-written phrasings are expanded at load by ``fluorosam_rt.phrasings`` (laterality, numbering,
plural, misspelling variants) and split into training and held-out phrasings; training only ever sees the
former, the robustness evaluation the latter.
"""

from __future__ import annotations

import copy
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fluorosam_rt.phrasings import expand_vocabulary
from fluorosam_rt.text.base import normalize_prompt

DEFAULT_VOCABULARY = Path(__file__).resolve().parents[2] / "configs" / "vocabulary.yaml"
USER_TOOL_PLACEHOLDER = "custom_tool"  # the vocabulary's category for users' STL tools


_LOADED: dict[tuple[str, int, int], Vocabulary] = {}


class UnknownStructureError(KeyError):
    """A structure, group or tool name that is not in the vocabulary."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Category:
    """One promptable category: an anatomical structure, a group, or a tool."""

    id: int
    name: str
    prompt: str
    phrasings: tuple[str, ...]  # every phrasing but the canonical prompt: train_phrasings + heldout_phrasings
    kind: str  # "structure" | "group" | "tool"
    members: tuple[str, ...] = ()
    material: str | None = None
    synonyms: tuple[str, ...] = ()  # the hand-written phrasings in the YAML, before expansion
    train_phrasings: tuple[str, ...] = ()
    heldout_phrasings: tuple[str, ...] = ()  # never used in training; for the robustness evaluation

    def to_coco(self) -> dict[str, Any]:
        """A data set's category: ``phrasings`` training may use, ``heldout_phrasings`` it may not."""
        return {
            "id": self.id,
            "name": self.name,
            "supercategory": self.kind,
            "prompt": self.prompt,
            "phrasings": list(self.train_phrasings),
            "heldout_phrasings": list(self.heldout_phrasings),
        }


class Vocabulary:
    """Lookup and group resolution over the vocabulary file."""

    def __init__(self, doc: dict[str, Any]):
        self._doc = doc
        self.categories: list[Category] = []
        expanded = expand_vocabulary(doc)
        for kind, key in (("structure", "structures"), ("group", "groups"), ("tool", "tools")):
            for e in doc.get(key, []):
                ex = expanded[str(e["name"])]
                self.categories.append(
                    Category(
                        id=int(e["id"]),
                        name=str(e["name"]),
                        prompt=str(e["prompt"]),
                        phrasings=tuple(p.text for p in ex.phrasings),
                        kind=kind,
                        members=tuple(e.get("members") or ()),
                        material=e.get("material"),
                        synonyms=ex.synonyms,
                        train_phrasings=ex.train,
                        heldout_phrasings=ex.heldout_phrasings,
                    )
                )
        self.heldout_keys = frozenset(
            normalize_prompt(p) for c in self.categories for p in c.heldout_phrasings
        )
        self.by_name = {c.name: c for c in self.categories}
        self.by_id = {c.id: c for c in self.categories}
        if len(self.by_name) != len(self.categories) or len(self.by_id) != len(self.categories):
            raise ValueError("vocabulary has duplicate names or ids")
        self.structures_by_id = {c.id: c for c in self.categories if c.kind == "structure"}
        self.tools = [c for c in self.categories if c.kind == "tool"]
        self.groups = [c for c in self.categories if c.kind == "group"]
        for g in self.groups:
            self.leaves(g.name)  # validates members and cycles eagerly

    @classmethod
    def load(cls, path: str | Path | None = None) -> Vocabulary:
        """The vocabulary file, parsed and expanded once per process while the file is unchanged.

        Expanding every phrasing takes a noticeable fraction of a second and the data engine asks for
        the vocabulary in many places; a Vocabulary is never modified after construction
        (``with_user_tools`` returns a new one), so sharing one instance is safe.
        """
        p = Path(path or DEFAULT_VOCABULARY).resolve()
        st = p.stat()
        key = (str(p), st.st_mtime_ns, st.st_size)
        if key not in _LOADED:
            with open(p) as f:
                _LOADED[key] = cls(yaml.safe_load(f))
        return _LOADED[key]

    def get(self, name: str) -> Category:
        """Category by name; unknown names raise with the closest known names."""
        if name in self.by_name:
            return self.by_name[name]
        close = difflib.get_close_matches(name, list(self.by_name), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownStructureError(f"unknown structure name {name!r}{hint}")

    def structure_id(self, name: str) -> int:
        cat = self.get(name)
        if cat.kind != "structure":
            raise UnknownStructureError(f"{name!r} is a {cat.kind}, not a TotalSegmentator structure")
        return cat.id

    def leaves(self, name: str, _stack: tuple[str, ...] = ()) -> list[str]:
        """Structure and tool names a category stands for (groups flattened recursively)."""
        if name in _stack:
            raise ValueError(f"group cycle: {' -> '.join((*_stack, name))}")
        cat = self.get(name)
        if cat.kind != "group":
            return [cat.name]
        out: list[str] = []
        for m in cat.members:
            for leaf in self.leaves(m, (*_stack, name)):
                if leaf not in out:
                    out.append(leaf)
        return out

    def leaf_ids(self, name: str) -> list[int]:
        """Category ids of ``leaves(name)``; raises on unknown names like ``leaves``."""
        return [self.by_name[leaf].id for leaf in self.leaves(name)]

    def group_member_ids(self) -> dict[int, list[int]]:
        """Group id -> ids of its leaf structures/tools."""
        return {g.id: [self.by_name[n].id for n in self.leaves(g.name)] for g in self.groups}

    def with_user_tools(self, names: list[str | None], materials: list[str]) -> tuple[Vocabulary, list[int]]:
        """A copy whose user-tool categories carry the users' names as prompts; returns it and each tool's id.

        The placeholder (``custom_tool``, the highest tool id) takes the first distinct name, so a data set
        with one user tool keeps the id the node's vocabulary knows; further distinct names take the free ids
        below it and join every group the placeholder is in (the all-tools group). Tools given the same name,
        or none, share a category: their masks are one union, like several screws of one kind.
        """
        doc = copy.deepcopy(self._doc)
        tools = doc.get("tools", [])
        holder = next((t for t in tools if t["name"] == USER_TOOL_PLACEHOLDER), None)
        if holder is None:
            raise UnknownStructureError(f"the vocabulary has no {USER_TOOL_PLACEHOLDER!r} placeholder tool")
        used = {c.id for c in self.categories}
        keys: list[str | None] = []
        for n in names:
            if n not in keys:
                keys.append(n)
        ids: dict[str | None, int] = {}
        free = int(holder["id"])
        for k, key in enumerate(keys):
            mat = materials[names.index(key)]
            if k == 0:
                entry, ids[key] = holder, int(holder["id"])
            else:
                free -= 1
                while free in used:
                    free -= 1
                if free <= 300:
                    raise ValueError("too many distinct user tool names for the tool id range 301-399")
                entry = {"id": free, "name": f"{USER_TOOL_PLACEHOLDER}_{free}"}
                tools.append(entry)
                ids[key] = free
                for g in doc.get("groups", []):
                    if USER_TOOL_PLACEHOLDER in (g.get("members") or []):
                        g["members"].append(entry["name"])
            base = self.by_name[USER_TOOL_PLACEHOLDER]
            if key is not None:
                entry["prompt"] = key
                entry["phrasings"] = [p for p in (base.prompt, *base.synonyms) if p != key]
            else:
                entry["prompt"], entry["phrasings"] = base.prompt, list(base.synonyms)
            entry["material"] = mat
        return Vocabulary(doc), [ids[n] for n in names]

    def coco_categories(self) -> list[dict[str, Any]]:
        return [c.to_coco() for c in self.categories]

    def is_heldout(self, text: str) -> bool:
        """Whether a text is a held-out phrasing of some entry (training must never use it)."""
        return normalize_prompt(text) in self.heldout_keys


@functools.cache
def default_heldout_keys() -> frozenset[str]:
    """Normalised held-out phrasings of the default vocabulary, loaded once per process."""
    return Vocabulary.load().heldout_keys
