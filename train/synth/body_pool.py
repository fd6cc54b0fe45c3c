"""Prepared bodies on disk and in a worker's memory: prepare once, load lazily, keep at most a few.

Preparing a body (HU -> material densities, label bit-fields, anchors) takes seconds to a minute and its
result is the same for every run with the same spacings, so it is cached as an ``.npz``:

* body folders (registered bodies and any folder in their layout) in
  ``bodies_root()/.prepared/<name>-<key>.npz``, shared by runs, workers and shards (the key hashes the
  folder, the spacings and the body files' sizes and mtimes, so a rebuilt body is prepared again);
* single CT files in the run's own ``.cache/`` (removed when the run ends).

The first worker that needs a body prepares it under an exclusive ``flock`` while the others wait, then
all load the file. A worker keeps at most ``max_bodies`` prepared bodies (least recently used out), so its
memory is bounded by the largest bodies, not by how many the run has.

The shared cache is bounded too: a rebuilt body or another spacing leaves its old file behind, so after
each new file the least recently used ones (a load touches its file's mtime) are removed until the cache
holds at most ``$FLUOROSAM_PREPARED_MAX_GB`` (default 8) GiB. A file removed under a reader that had
only checked it exists is prepared again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from train.synth.ct_source import CTSource
from train.synth.volume import PreparedVolume, prepare_volume

CACHE_VERSION = 1  # bump when prepare_volume's output changes
T = TypeVar("T")
PREPARE_SEED = 0  # tool-site subsampling in prepare_volume; fixed so one cache serves every run seed


def prepared_cache_path(folder: Path, name: str, density_mm: float, label_mm: float) -> Path:
    """Where a body folder's prepared volume is cached for these spacings (``bodies_root()/.prepared``).

    The key hashes the folder's absolute path, the spacings and the body files' sizes and mtimes, so a
    rebuilt or edited body is prepared again and two folders never share an entry.
    """
    from train.synth.bodies import bodies_root

    h = hashlib.sha1(f"v{CACHE_VERSION}|{folder.resolve()}|{density_mm}|{label_mm}".encode())
    for f in ("ct.nii.gz", "labels.nii.gz", "structures.csv"):
        st = (folder / f).stat()
        h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return bodies_root() / ".prepared" / f"{name}-{h.hexdigest()[:12]}.npz"


def save_atomic(vol: PreparedVolume, path: Path) -> None:
    """Write to a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            vol.save(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_touch(path: Path) -> PreparedVolume | None:
    """Load and mark as recently used; None when the file is gone (pruned by another process)."""
    try:
        vol = PreparedVolume.load(path)
        os.utime(path)
    except FileNotFoundError:
        return None
    return vol


def prune_prepared(folder: Path, keep: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used ``*.npz`` in ``folder`` (never ``keep``) until it holds <= max_bytes."""
    files = []
    for f in folder.glob("*.npz"):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    removed = []
    for _, size, f in sorted(files):
        if total <= max_bytes:
            break
        if f == keep:
            continue
        f.unlink(missing_ok=True)
        f.with_name(f".{f.name}.lock").unlink(missing_ok=True)
        total -= size
        removed.append(f)
    return removed


def prepared_cache_max_bytes() -> int:
    return int(float(os.environ.get("FLUOROSAM_PREPARED_MAX_GB", "8")) * 2**30)


def load_or_prepare(
    path: Path, read: Callable[[], CTSource], density_mm: float, label_mm: float
) -> PreparedVolume:
    """The cached prepared volume at ``path``, preparing it from ``read()`` first if nobody has yet."""
    if path.exists() and (vol := _load_touch(path)) is not None:
        return vol
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists() or (vol := _load_touch(path)) is None:
            vol = prepare_volume(read(), density_mm, label_mm, seed=PREPARE_SEED)
            save_atomic(vol, path)
            prune_prepared(path.parent, path, prepared_cache_max_bytes())
        return vol


class BodyPool(Generic[T]):
    """A worker's prepared bodies, least recently used dropped beyond ``max_bodies``."""

    def __init__(self, max_bodies: int = 2):
        self.max_bodies = max(1, max_bodies)
        self._vols: OrderedDict[str, T] = OrderedDict()
        self.loads = 0  # how many times a body was (re)loaded: locality check in the tests

    def get(self, name: str, load: Callable[[], T]) -> T:
        if name in self._vols:
            self._vols.move_to_end(name)
            return self._vols[name]
        while len(self._vols) >= self.max_bodies:
            self._vols.popitem(last=False)
        vol = load()
        self.loads += 1
        self._vols[name] = vol
        return vol
