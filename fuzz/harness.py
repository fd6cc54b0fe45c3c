"""What every atheris harness in this folder shares: seed corpus, working folder, libFuzzer flags.

A harness is ``python fuzz/fuzz_TARGET.py [libFuzzer flags] [CORPUS_DIR ...]``, e.g.
``-runs=100000``. Its seeds are small valid inputs made at start-up (never committed); they are
written to ``FUZZ_DIR/TARGET/seeds`` and given to libFuzzer after any corpus folder on the
command line. Without one, libFuzzer keeps what it learns in ``FUZZ_DIR/TARGET/corpus``, and a
crashing input is saved as ``FUZZ_DIR/TARGET/crash-SHA1`` (FUZZ_DIR defaults to out/fuzz, which
git ignores). Re-run a saved input with ``python fuzz/fuzz_TARGET.py FILE``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quiet() -> None:
    """Rejected inputs are the normal case: keep pydicom's warnings and log lines off stderr."""
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)


def run(target: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    import atheris

    work = Path(os.environ.get("FUZZ_DIR", REPO / "out" / "fuzz")) / target
    seed_dir = work / "seeds"
    seed_dir.mkdir(parents=True, exist_ok=True)
    for old in seed_dir.iterdir():
        old.unlink()
    for i, seed in enumerate(seeds):
        (seed_dir / f"seed-{i:03d}").write_bytes(seed)
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    paths = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not any(f.startswith("-artifact_prefix=") for f in flags):
        flags.append(f"-artifact_prefix={work}/")
    if len(paths) == 1 and Path(paths[0]).is_file():
        argv = [sys.argv[0], *flags, *paths]  # reproduce one saved input
    else:
        if not paths:
            (work / "corpus").mkdir(exist_ok=True)
            paths = [str(work / "corpus")]
        argv = [sys.argv[0], *flags, *paths, str(seed_dir)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def split_parts(data: bytes, max_parts: int = 16) -> list[bytes]:
    """Bytes -> message parts: each part is a 2-byte big-endian length and that many bytes (the
    last part takes what is left). join_parts is the inverse, for seeds."""
    parts: list[bytes] = []
    while data and len(parts) < max_parts:
        n = int.from_bytes(data[:2], "big")
        parts.append(data[2 : 2 + n])
        data = data[2 + n :]
    return parts


def join_parts(parts: Iterable[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)
