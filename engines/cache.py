"""Engine cache: exported ONNX graphs and TensorRT plans, keyed so a stale file is never used.

A TensorRT plan only runs on the GPU model, TensorRT version and precision it was built for,
and only means anything for the weights it was built from. Every cached file therefore has a
key holding all of those; the manifest stores the full key next to the file's digest, and a
lookup returns a file only when the key matches field for field and the bytes are intact. A
mismatch means "rebuild", never "try loading and see".

The cache lives under ``~/.cache/fluorosam-rt/engines`` (``FLUOROSAM_RT_ENGINE_CACHE`` or an
explicit path override it) and refuses to live inside the source repository, where generated
multi-hundred-megabyte files would end up in commits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .base import EngineError

ENV_VAR = "FLUOROSAM_RT_ENGINE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/fluorosam-rt/engines")
REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
# Bumped whenever the exported graphs' signature or semantics change.
GRAPH_FORMAT = "fluorosam-rt-graphs/1"
# Off the frame path, so not part of what an engine computes.
_EXCLUDED_PREFIXES = ("prompt_encoder.text_model.", "prompt_encoder.clip_mlp.", "prompt_encoder.vq.")


def resolve_cache_dir(override: str | Path | None = None) -> Path:
    """The cache directory: explicit path, else $FLUOROSAM_RT_ENGINE_CACHE, else ~/.cache/..."""
    raw = override if override is not None else os.environ.get(ENV_VAR) or DEFAULT_CACHE_DIR
    path = Path(raw).expanduser().resolve()
    if path == REPO_ROOT or REPO_ROOT in path.parents:
        raise EngineError(
            f"engine cache {path} is inside the source repository {REPO_ROOT}; "
            f"use a directory outside it (default {DEFAULT_CACHE_DIR})"
        )
    return path


def model_hash(model: torch.nn.Module) -> str:
    """Digest of the config and every frame-path tensor: what an engine's output depends on."""
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    tensors = dict(model.state_dict())
    pe = getattr(model, "prompt_encoder", None)
    if pe is not None:  # non-persistent but model-defining
        tensors["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = (
            pe.pe_layer.positional_encoding_gaussian_matrix
        )
    for name in sorted(tensors):
        if name.startswith(_EXCLUDED_PREFIXES):
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything a cached artefact is only valid for."""

    kind: str  # "onnx" or "trt"
    graph: str  # "encoder", "decoder", "decoder_points"
    model_hash: str
    precision: str = "fp32"
    gpu_name: str = ""
    compute_capability: str = ""
    trt_version: str = ""
    max_prompts: int = 0
    max_points: int = 0
    graph_format: str = GRAPH_FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def filename(self) -> str:
        """Readable and unique: the readable part says what it is, the digest makes it exact."""
        ext = "onnx" if self.kind == "onnx" else "engine"
        parts = [self.graph, self.model_hash[:12], self.precision]
        if self.kind == "trt":
            parts += [_slug(self.gpu_name), f"sm{self.compute_capability.replace('.', '')}"]
            parts += [f"trt{self.trt_version}", f"k{self.max_prompts}"]
        return "-".join(parts) + f"-{self.digest()[:10]}.{ext}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineKey:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "unknown"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class EngineCache:
    """A directory of artefacts plus a manifest that records each one's key and digest."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = resolve_cache_dir(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return {"entries": {}}
        except (OSError, json.JSONDecodeError):
            # A corrupt manifest makes every entry untrusted: rebuild rather than guess.
            return {"entries": {}}
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return {"entries": {}}
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".manifest-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, self.manifest_path)

    def path_for(self, key: EngineKey) -> Path:
        return self.root / key.filename()

    def lookup(self, key: EngineKey) -> Path | None:
        """The artefact for exactly this key, or None (missing, other key, or corrupted)."""
        entry = self._read()["entries"].get(key.filename())
        if entry is None or EngineKey.from_dict(entry.get("key", {})) != key:
            return None
        path = self.path_for(key)
        if not path.is_file() or _sha256_file(path) != entry.get("sha256"):
            return None
        return path

    def mismatches(self, key: EngineKey) -> list[tuple[str, dict[str, tuple[Any, Any]]]]:
        """Cached artefacts of the same graph and kind that differ from key, with the fields.

        Used to explain a rebuild ("built for NVIDIA A100, this is an H200").
        """
        out = []
        want = asdict(key)
        for name, entry in self._read()["entries"].items():
            have = entry.get("key", {})
            if have.get("kind") != key.kind or have.get("graph") != key.graph:
                continue
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                out.append((name, diff))
        return out

    def store(self, key: EngineKey, data: bytes | None = None, source: Path | None = None) -> Path:
        """Write bytes (or move a finished file) under key's name and record it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        if source is not None:
            os.replace(source, path)
        elif data is not None:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".artefact-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            raise ValueError("store needs data or source")
        manifest = self._read()
        manifest["entries"][path.name] = {
            "key": asdict(key),
            "sha256": _sha256_file(path),
            "bytes": path.stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._write(manifest)
        return path

    def entries(self) -> list[dict[str, Any]]:
        """Every manifest entry with its file name and whether the file is still intact."""
        out = []
        for name, entry in sorted(self._read()["entries"].items()):
            path = self.root / name
            intact = path.is_file() and _sha256_file(path) == entry.get("sha256")
            out.append({"file": name, "intact": intact, **entry})
        return out

    def remove(self, name: str) -> None:
        manifest = self._read()
        manifest["entries"].pop(name, None)
        (self.root / name).unlink(missing_ok=True)
        self._write(manifest)

    def scratch_dir(self) -> Path:
        """A private folder inside the cache for half-written artefacts (same filesystem)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root, prefix=".build-"))
