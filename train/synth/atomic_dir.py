"""Write a data set into a hidden folder next to its destination and rename it into place at the end.

A run that fails (bad input found late, a worker error, Ctrl-C) removes its staging folder, so the
destination is either the complete new set, the previous set untouched, or absent: never half-written.
A run killed outright (SIGKILL, power) leaves a ``.<name>.tmp-*`` folder beside the destination, which
can be deleted; the destination itself is still whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputError(ValueError):
    """An output folder that must not be written, with the reason."""


def check_target(final: Path) -> None:
    """Refuse a destination that holds something other than an earlier data set (it would be replaced)."""
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder")
    if final.is_dir() and any(final.iterdir()) and not (final / "dataset.json").exists():
        raise OutputError(
            f"{final}: folder is not empty and holds no dataset.json (not a data set this tool wrote); "
            "choose another --out"
        )


@contextmanager
def staged(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder; on normal exit it replaces ``final``, on any error it is removed."""
    final = Path(final)
    check_target(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the set should read like any folder
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an earlier set there is moved aside first and deleted after."""
    check_target(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
