"""A test mannequin: a whole supine body (RAS+ mm, arms at the sides, palms forward) made of analytic shapes.

Views and tool sites only read a body's label sample points and centroids, so tests build those directly
from shapes (no CT, no rendering) in milliseconds. Proportions follow an adult: hip joints at z = 0, lumbar
bodies 44 mm wide with a canal behind them, a femoral neck at 135° to the shaft, the scapular plane 35°
forward of the coronal plane, the patella in front of the knee, five separate metacarpals.
"""

from __future__ import annotations

import numpy as np
import torch

from train.synth.vocabulary import Vocabulary
from train.synth.volume import PreparedVolume

N_POINTS = 4000  # as many sample points per label as prepare_volume keeps


def _rot_frame(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u = u / np.linalg.norm(u)
    v = v - (v @ u) * u
    v = v / np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)])


class _Shape:
    def __init__(self, kind: str, **p):
        self.kind, self.p = kind, p

    def volume(self) -> float:
        p = self.p
        if self.kind == "ellipsoid":
            return 4 / 3 * np.pi * float(np.prod(p["radii"]))
        if self.kind == "shell":
            return 4 / 3 * np.pi * float(np.prod(p["radii"])) * (1 - p["inner"] ** 3)
        if self.kind == "capsule":
            return (
                np.pi * p["r"] ** 2 * float(np.linalg.norm(p["p1"] - p["p0"])) + 4 / 3 * np.pi * p["r"] ** 3
            )
        return 8.0 * float(np.prod(p["half"]))  # box

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = self.p
        out: list[np.ndarray] = []
        while sum(len(o) for o in out) < n:
            if self.kind in ("ellipsoid", "shell"):
                x = rng.uniform(-1, 1, (4 * n, 3))
                rr = np.linalg.norm(x, axis=1)
                keep = (rr <= 1) & ((rr >= p["inner"]) if self.kind == "shell" else True)
                if "half_space" in p:
                    keep &= x @ p["half_space"] > 0
                out.append(p["centre"] + x[keep] * p["radii"])
            elif self.kind == "capsule":
                a, b, r = p["p0"], p["p1"], p["r"]
                lo, hi = np.minimum(a, b) - r, np.maximum(a, b) + r
                x = rng.uniform(lo, hi, (4 * n, 3))
                ab = b - a
                t = np.clip((x - a) @ ab / (ab @ ab), 0, 1)
                d = np.linalg.norm(x - a - t[:, None] * ab, axis=1)
                out.append(x[d <= r])
            else:
                x = rng.uniform(-1, 1, (n, 3)) * p["half"]
                out.append(p["centre"] + x @ p["frame"])
        return np.concatenate(out)[:n]


def ell(c, r, **kw) -> _Shape:
    return _Shape("ellipsoid", centre=np.array(c, float), radii=np.array(r, float), **kw)


def cap(a, b, r) -> _Shape:
    return _Shape("capsule", p0=np.array(a, float), p1=np.array(b, float), r=float(r))


def box(c, u, v, half) -> _Shape:
    return _Shape(
        "box",
        centre=np.array(c, float),
        frame=_rot_frame(np.array(u, float), np.array(v, float)),
        half=np.array(half, float),
    )


def _vertebra(z: float, yb: float, rb: float, hb: float, ped: float, spin: float) -> list[_Shape]:
    """Body (cylinder along z), two pedicles, laminae and a spinous process: the canal is left empty."""
    back = yb - rb
    out = [ell([0, yb, z], [rb, rb, hb / 2])]
    for s in (-1, 1):
        px = s * max(rb * 0.7, 11.0)  # pedicles flank a canal ~22 mm wide
        out.append(cap([px, back + 2, z], [px, back - ped, z], max(2.5, rb * 0.22)))
        out.append(cap([px, back - ped, z], [0, back - ped - 6, z], 2.5))  # lamina
        out.append(cap([px, back - ped * 0.6, z], [s * (rb + 18), back - ped * 0.8, z], 3.0))  # transverse
    out.append(cap([0, back - ped - 6, z], [0, back - ped - 6 - spin, z - spin * 0.3], 3.5))
    return out


def _side(s: float) -> dict[str, list[_Shape]]:
    """Left (s = -1) or right (s = +1) limbs and girdles: x mirrored."""
    x = lambda v: s * v  # noqa: E731
    sfx = "left" if s < 0 else "right"
    glen = np.array([x(160), -20, 440])
    u = np.array([-x(1) * np.cos(np.deg2rad(35)), -np.sin(np.deg2rad(35)), 0.0])  # medial-posterior
    parts = {
        f"hip_{sfx}": [
            box([x(85), 2, 85], [x(80), 65, 0], [0, 0, 1], [52, 35, 4]),
            _Shape(
                "shell",
                centre=np.array([x(90), 10, 0]),
                radii=np.array([33, 33, 33]),
                inner=0.78,
                half_space=np.array([-x(1), 0, 1.0]),
            ),
            cap([x(80), 25, -15], [x(14), 45, -25], 10),
            cap([x(90), -5, -20], [x(75), -15, -60], 12),
            cap([x(75), -15, -60], [x(14), 38, -38], 7),
            ell([x(55), -25, 70], [12, 18, 30]),
        ],
        f"femur_{sfx}": [
            ell([x(90), 10, 0], [23, 23, 23]),
            cap([x(90), 10, 0], [x(125), 5, -35], 15),
            ell([x(135), -5, -30], [15, 18, 22]),
            cap([x(128), 5, -45], [x(105), 10, -420], 14),
            ell([x(105), 5, -430], [40, 30, 25]),
        ],
        f"patella_{sfx}": [ell([x(105), 45, -415], [20, 9, 24])],
        f"tibia_{sfx}": [ell([x(105), 5, -468], [38, 28, 14]), cap([x(105), 5, -470], [x(100), 5, -820], 14)],
        f"fibula_{sfx}": [cap([x(140), -10, -480], [x(132), -5, -810], 7)],
        f"humerus_{sfx}": [
            ell([x(182), -15, 440], [22, 22, 22]),
            cap([x(190), -15, 420], [x(205), -15, 150], 11),
            ell([x(205), -10, 140], [30, 15, 12]),
        ],
        f"scapula_{sfx}": [
            box(glen + u * 55 - np.array([0, 0, 40]), u, [0, 0, 1], [50, 65, 3]),
            ell(glen - u * 0 + np.array([x(-2), 2, 0]), [8, 12, 18]),
        ],
        f"clavicula_{sfx}": [cap([x(20), 35, 480], [x(150), -5, 470], 7)],
        f"radius_{sfx}": [cap([x(215), -5, 120], [x(225), 5, -105], 8), ell([x(222), 8, -112], [16, 10, 8])],
        f"ulna_{sfx}": [cap([x(185), -15, 130], [x(195), 0, -105], 7)],
        f"carpals_{sfx}": [ell([x(212), 10, -135], [22, 9, 14])],
        f"metacarpals_{sfx}": [
            cap([x(186 + 13 * i), 10, -152], [x(186 + 13 * i), 12, -205], 4) for i in range(4)
        ]
        + [cap([x(240), 14, -148], [x(252), 24, -180], 4)],
        f"phalanges_hand_{sfx}": [
            cap([x(186 + 13 * i), 12, -212], [x(186 + 13 * i), 14, -275], 3.5) for i in range(4)
        ]
        + [cap([x(255), 26, -187], [x(262), 34, -220], 3.5)],
        f"lung_upper_lobe_{sfx}": [ell([x(80), -10, 410], [50, 60, 70])],
        f"lung_lower_lobe_{sfx}": [ell([x(80), -20, 320], [55, 70, 60])],
        f"iliac_artery_{sfx}": [cap([x(15), 35, 100], [x(70), 40, 10], 5)],
    }
    return parts


def mannequin_shapes(without: tuple[str, ...] = ()) -> dict[str, list[_Shape]]:
    shapes: dict[str, list[_Shape]] = {
        "skull": [_Shape("shell", centre=np.array([0, 0, 690.0]), radii=np.array([70, 90, 85.0]), inner=0.88)]
    }
    for i in range(1, 6):  # L1 (top) .. L5
        shapes[f"vertebrae_L{i}"] = _vertebra(215 - 30 * (i - 1), 0.0, 22, 25, 15, 30)
    for i in range(1, 13):
        shapes[f"vertebrae_T{i}"] = _vertebra(482 - 22 * (i - 1), -20.0, 14, 18, 12, 30)
    for i in range(1, 8):
        shapes[f"vertebrae_C{i}"] = _vertebra(596 - 16 * (i - 1), -10.0, 8, 12, 8, 15)
    shapes["sacrum"] = [
        ell([0, -10, 60], [48, 20, 20]),
        ell([0, -30, 25], [35, 15, 20]),
        ell([0, -45, -5], [20, 10, 15]),
    ]
    shapes["heart"] = [ell([-25, 30, 330], [55, 45, 50])]
    shapes["lung_middle_lobe_right"] = [ell([80, 30, 340], [45, 30, 35])]
    shapes["aorta"] = [cap([-15, 35, 100], [-15, 25, 380], 11)]
    shapes["superior_vena_cava"] = [cap([20, 25, 360], [20, 20, 440], 10)]
    shapes["sternum"] = [cap([0, 80, 300], [0, 75, 460], 10)]
    for s in (-1.0, 1.0):
        shapes.update(_side(s))
    return {k: v for k, v in shapes.items() if not (without and k.startswith(without))}


def mannequin_volume(seed: int = 0, without: tuple[str, ...] = (), name: str = "mannequin") -> PreparedVolume:
    """The mannequin as a PreparedVolume with label points and centroids (a tiny empty density grid)."""
    vocab = Vocabulary.load()
    rng = np.random.default_rng(seed)
    points: dict[int, np.ndarray] = {}
    for struct, parts in mannequin_shapes(without).items():
        vols = np.array([p.volume() for p in parts])
        counts = np.maximum(1, np.round(N_POINTS * vols / vols.sum())).astype(int)
        pts = np.concatenate([p.sample(rng, int(k)) for p, k in zip(parts, counts)])
        points[vocab.structure_id(struct)] = pts.astype(np.float32)
    ids = sorted(points)
    return PreparedVolume(
        name=name,
        materials=torch.zeros(1, 3, 2, 2, 2),
        materials_affine=np.array(  # two voxels spanning the whole body (views keep aims inside the CT)
            [[600.0, 0, 0, -300], [0, 300.0, 0, -150], [0, 0, 1700.0, -880], [0, 0, 0, 1]]
        ),
        label_bits=torch.zeros(1, 2, 2, 2),
        labels_affine=np.eye(4),
        present_ids=ids,
        anchors={i: points[i].astype(np.float64).mean(0) for i in ids},
        points=points,
    )
