"""COCO run-length encoding (the compressed string form pycocotools writes), implemented from its format.

Masks are flattened column-major (Fortran order); runs alternate starting with background; the string stores
each run (after the third, as the difference to the run two back) in 5-bit groups with a continuation bit,
offset by 48 into printable ASCII.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _runs(mask: np.ndarray) -> list[int]:
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def _to_string(counts: list[int]) -> str:
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def _from_string(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            ch = ord(s[p]) - 48
            x |= (ch & 0x1F) << (5 * k)
            more = bool(ch & 0x20)
            p += 1
            k += 1
            if not more and (ch & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> {"size": [H, W], "counts": str}."""
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": _to_string(_runs(mask))}


def decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of ``encode`` (also accepts uncompressed list counts)."""
    h, w = rle["size"]
    counts = rle["counts"] if isinstance(rle["counts"], list) else _from_string(rle["counts"])
    vals = np.zeros(len(counts), dtype=bool)
    vals[1::2] = True
    flat = np.repeat(vals, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE covers {flat.size} pixels, expected {h * w}")
    return flat.reshape((h, w), order="F")


def area(rle: dict[str, Any]) -> int:
    counts = rle["counts"] if isinstance(rle["counts"], list) else _from_string(rle["counts"])
    return int(sum(counts[1::2]))


def bbox(mask: np.ndarray) -> list[float]:
    """COCO [x, y, w, h] of a mask (pixels)."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))  # two projections, not a full nonzero
    if len(cols) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] - x0 + 1), float(rows[-1] - y0 + 1)]
