"""Instance ids that stay the same from one frame to the next.

A navigation system that shows "K-wire 2" must not see it become "K-wire 5" because the C-arm
moved a little. Each prompt keeps a short list of tracks; each frame's instances are matched to
them greedily, best pair first, by how much their bounding boxes overlap and how far their
centroids moved. Greedy is exact enough here: a prompt has a handful of instances, and a slow
C-arm moves each far less than the distance between two of them.

* A track that finds no instance survives ``max_missed`` frames, so one frame where the model
  misses a wire does not renumber it.
* Ids are unique for the node's lifetime (never reused), so a consumer can key on (prompt, id).
* A scene cut (temporal.py) or a prompt removed clears the tracks: after the C-arm jumps to
  another view there is no honest way to say which wire is which, so instances get new ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Box = tuple[int, int, int, int]  # x, y, width, height
Point = tuple[float, float]


@dataclass
class Track:
    id: int
    bbox: Box
    centroid: Point
    tip: Point | None = None
    missed: int = 0


def box_iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


class InstanceTracker:
    def __init__(self, max_missed: int = 5, min_gate_px: float = 24.0) -> None:
        self.max_missed = max_missed
        self.min_gate_px = min_gate_px  # a centroid may always move this far between frames
        self._tracks: dict[str, list[Track]] = {}
        self._ids = itertools.count(1)

    def reset(self) -> None:
        self._tracks.clear()

    def keep_only(self, prompt_ids: Iterable[str]) -> None:
        keep = set(prompt_ids)
        for pid in [p for p in self._tracks if p not in keep]:
            del self._tracks[pid]

    def update(self, prompt_id: str, boxes: Sequence[Box], centroids: Sequence[Point]) -> list[Track]:
        """The track of each instance, in the given order (new tracks for unmatched instances)."""
        tracks = self._tracks.setdefault(prompt_id, [])
        pairs = []
        for i, (box, c) in enumerate(zip(boxes, centroids)):
            for j, tr in enumerate(tracks):
                dist = ((c[0] - tr.centroid[0]) ** 2 + (c[1] - tr.centroid[1]) ** 2) ** 0.5
                gate = max(self.min_gate_px, 0.5 * max(tr.bbox[2], tr.bbox[3]))
                iou = box_iou(box, tr.bbox)
                if iou > 0 or dist < gate:
                    pairs.append((iou - dist / gate, i, j))
        pairs.sort(reverse=True)
        out: list[Track | None] = [None] * len(boxes)
        used: set[int] = set()
        for _, i, j in pairs:
            if out[i] is None and j not in used:
                out[i] = tracks[j]
                used.add(j)
        for j, tr in enumerate(tracks):
            tr.missed = 0 if j in used else tr.missed + 1
        for i, tr in enumerate(out):
            if tr is None:
                tr = Track(id=next(self._ids), bbox=boxes[i], centroid=centroids[i])
                tracks.append(tr)
                out[i] = tr
            tr.bbox, tr.centroid = boxes[i], centroids[i]
        tracks[:] = [t for t in tracks if t.missed <= self.max_missed]
        return [t for t in out if t is not None]
