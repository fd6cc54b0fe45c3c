"""One scenario's tools: anywhere on the anatomy (``tools.TOOL_MAKERS``) or at a region's surgical sites.

The dispatcher sits above both ``tools`` (the shapes and the anywhere-makers) and ``tool_sites`` (which
builds its sites from those shapes), so neither imports the other back.
"""

from __future__ import annotations

import numpy as np

from train.synth.tool_sites import sample_region_tools
from train.synth.tools import TOOL_MAKERS, Tool
from train.synth.volume import PreparedVolume


def sample_tools(
    rng: np.random.Generator,
    vol: PreparedVolume,
    p_none: float = 0.3,
    region: str | None = None,
    max_kinds: int = 3,
) -> list[Tool]:
    """A random, plausible tool set for one scenario (possibly empty).

    ``region`` None: anywhere on the anatomy (the original behaviour: same draws, same tools for a seed).
    A region name: 1-``max_kinds`` tool sites that make sense there (``tool_sites.REGION_SITES``), placed
    from the body's landmarks; raises when the body does not have the region.
    """
    if region is not None:
        return sample_region_tools(rng, vol, region, p_none=p_none, max_kinds=max_kinds)
    if rng.random() < p_none:
        return []
    names = list(TOOL_MAKERS)
    k = int(rng.integers(1, max_kinds + 1))
    out: list[Tool] = []
    for name in rng.choice(names, size=k, replace=False):
        out += TOOL_MAKERS[str(name)](rng, vol)
    return out
