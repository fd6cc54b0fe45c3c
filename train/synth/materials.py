"""Material compositions and mass attenuation coefficients, computed from xraydb's element tables.

xraydb has no bone or soft tissue, so tissues are given as ICRU-44 mass fractions and their mass attenuation
is the mass-fraction-weighted sum of the elements' (mixture rule). Metals and the polymer follow vendor data
sheets. Nothing here copies DeepDRR's data files: every number is a published composition or density.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Material:
    """A material as mass fractions (percent) and a nominal density in g/cm³."""

    name: str
    mass_percent: dict[str, float]
    density: float


# Order matters: it is the channel order of the projector's line-integral tensor.
MATERIALS: tuple[Material, ...] = (
    Material("air", {"C": 0.0124, "N": 75.5268, "O": 23.1781, "Ar": 1.2827}, 0.001205),
    # ICRU-44 adult soft tissue.
    Material(
        "soft_tissue",
        {"H": 10.2, "C": 14.3, "N": 3.4, "O": 70.8, "Na": 0.2, "P": 0.3, "S": 0.3, "Cl": 0.2, "K": 0.3},
        1.06,
    ),
    # ICRU-44 cortical bone.
    Material(
        "bone",
        {"H": 3.4, "C": 15.5, "N": 4.2, "O": 43.5, "Na": 0.1, "Mg": 0.2, "P": 10.3, "S": 0.3, "Ca": 22.5},
        1.92,
    ),
    # AISI 316L stainless steel (K-wires, pins, some screws).
    Material("stainless_steel", {"Fe": 65.5, "Cr": 17.0, "Ni": 12.0, "Mo": 2.5, "Mn": 2.0, "Si": 1.0}, 8.0),
    # Ti-6Al-4V (screws, plates).
    Material("titanium", {"Ti": 90.0, "Al": 6.0, "V": 4.0}, 4.43),
    # Nitinol, 55 wt% Ni (guidewires).
    Material("nitinol", {"Ni": 55.0, "Ti": 45.0}, 6.45),
    # Polyurethane catheter with 20 wt% BaSO4 radiopaque filler.
    Material("polymer", {"H": 6.4, "C": 52.0, "N": 6.4, "O": 21.9, "Ba": 11.8, "S": 2.7}, 1.45),
)
MATERIAL_NAMES: tuple[str, ...] = tuple(m.name for m in MATERIALS)
MATERIAL_INDEX: dict[str, int] = {n: i for i, n in enumerate(MATERIAL_NAMES)}
ANATOMY_MATERIALS = ("air", "soft_tissue", "bone")


@lru_cache(maxsize=1024)  # 7 kVp x 4 filters x 7 materials, with room
def _mass_attenuation_cached(name: str, energies_kev: tuple[float, ...]) -> np.ndarray:
    import xraydb  # lazy: only the physics stage needs it

    mat = MATERIALS[MATERIAL_INDEX[name]]
    e_ev = np.asarray(energies_kev, dtype=np.float64) * 1000.0
    total = sum(mat.mass_percent.values())
    mu = np.zeros_like(e_ev)
    for element, pct in mat.mass_percent.items():
        mu += (pct / total) * np.asarray(xraydb.mu_elam(element, e_ev), dtype=np.float64)
    return mu


def mass_attenuation(name: str, energies_kev: np.ndarray) -> np.ndarray:
    """Mass attenuation coefficient μ/ρ (cm²/g) of a material at the given photon energies (keV)."""
    return _mass_attenuation_cached(name, tuple(float(e) for e in np.atleast_1d(energies_kev))).copy()


def attenuation_table(energies_kev: np.ndarray) -> np.ndarray:
    """μ/ρ for every material in ``MATERIALS`` order: shape (n_energies, n_materials), cm²/g."""
    return np.stack([mass_attenuation(m.name, energies_kev) for m in MATERIALS], axis=1)


def hu_to_material_densities(hu: np.ndarray) -> np.ndarray:
    """Split a HU volume into per-material density channels (air, soft tissue, bone), g/cm³.

    Materials come from HU thresholds as in DeepDRR (air < -800 <= soft tissue <= 350 < bone). Density is
    water-equivalent (1 + HU/1000) up to 100 HU and a bone calibration line (1.017 + 0.000592·HU) above it, so
    marrow-rich bone between 100 and 350 HU stays soft tissue material but gets a bone-like density.
    """
    hu = hu.astype(np.float32, copy=False)
    rho = np.where(hu <= 100.0, 1.0 + hu / 1000.0, 1.017 + 0.000592 * hu).astype(np.float32)
    rho = np.clip(rho, 0.0, None)
    out = np.zeros((3, *hu.shape), dtype=np.float32)
    air = hu < -800.0
    bone = hu > 350.0
    out[0] = np.where(air, rho, 0.0)
    out[1] = np.where(~air & ~bone, rho, 0.0)
    out[2] = np.where(bone, rho, 0.0)
    return out
