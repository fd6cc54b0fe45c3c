"""Tabulated spekpy spectra and xraydb attenuation for a machine that cannot carry those packages.

Why: the lent GPU machine has no network and its working tree may hold 64 MiB, but spekpy installs
207 MB of data and the synthetic-data engine only ever asks it for a few dozen tube spectra (tube
voltages on a 5 kV grid, aluminium 2.5 mm, copper 0-0.3 mm: ``train/synth/physics.py``) and xraydb for
the elements of ``train/synth/materials.py`` at those spectra's bin energies. ``write_tables`` records
exactly those answers from the real packages here; ``scripts/gpu_pack.sh`` puts two one-line packages
named ``spekpy`` and ``xraydb`` beside the table that serve them (``Spek`` and ``mu_elam``), so the
unchanged synth code renders bit-identical images there. A question outside the table is an error that
names the missing entry, never a guess.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np

# What train/synth/physics.py can ask for: looks take multiples of 5 kV between 50 and 125 (or a range's
# lower bound, itself a multiple of 5); sample_physics takes 60..120 in 10s. A margin on both sides.
KVPS: tuple[int, ...] = tuple(range(40, 155, 5))
AL_MM: tuple[float, ...] = (2.5,)
CU_MM: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
TARGET_MM = 12.0  # the anode angle physics.py passes as th
TABLE_ENV = "FLUOROSAM_PHYSICS_TABLE"


def _spectrum_key(kvp: float, th: float, filters: tuple[tuple[str, float], ...]) -> str:
    parts = [f"kvp={float(kvp)!r}", f"th={float(th)!r}"] + [f"{m}={float(t)!r}" for m, t in filters]
    return "|".join(parts)


def write_tables(
    path: str | Path, kvps: tuple[int, ...] = KVPS, cu_mm: tuple[float, ...] = CU_MM
) -> dict[str, int]:
    """Record the spectra and attenuation coefficients the synth engine can use into ``path`` (.npz)."""
    import spekpy
    import xraydb

    from train.synth.materials import MATERIALS
    from train.synth.physics import binned_spectrum

    arrays: dict[str, np.ndarray] = {}
    keys: list[str] = []
    energies: set[float] = set()
    for kvp, al in itertools.product(kvps, AL_MM):
        base = spekpy.Spek(kvp=float(kvp), th=TARGET_MM)
        base.filter("Al", al)
        for cu in cu_mm:
            s = base
            filters: tuple[tuple[str, float], ...] = (("Al", al),)
            if cu > 0:
                s = copy.deepcopy(base)
                s.filter("Cu", cu)
                filters = (("Al", al), ("Cu", cu))
            k, phi = s.get_spectrum()
            key = _spectrum_key(kvp, TARGET_MM, filters)
            arrays[f"k/{key}"] = np.asarray(k, dtype=np.float64)
            arrays[f"phi/{key}"] = np.asarray(phi, dtype=np.float64)
            keys.append(key)
            e, _ = binned_spectrum(kvp, al_mm=al, cu_mm=cu)
            energies.update(float(v) * 1000.0 for v in e)  # materials.py asks xraydb in eV
    e_ev = np.array(sorted(energies), dtype=np.float64)
    elements = sorted({el for m in MATERIALS for el in m.mass_percent})
    for el in elements:
        arrays[f"mu/{el}"] = np.asarray(xraydb.mu_elam(el, e_ev), dtype=np.float64)
    arrays["energies_ev"] = e_ev
    arrays["elements"] = np.array(elements)
    arrays["spectra"] = np.array(keys)
    np.savez_compressed(path, **arrays)
    return {"spectra": len(keys), "energies": len(e_ev), "elements": len(elements)}


class _Table:
    def __init__(self, path: Path) -> None:
        with np.load(path) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.path = path
        e = self.arrays["energies_ev"]
        self.energy_index = {float(v): i for i, v in enumerate(e)}


_TABLE: _Table | None = None


def _table() -> _Table:
    global _TABLE
    if _TABLE is None:
        import os

        p = os.environ.get(TABLE_ENV, "")
        if not p or not Path(p).is_file():
            raise FileNotFoundError(f"{TABLE_ENV} must name the physics table (.npz) from gpu_pack.sh")
        _TABLE = _Table(Path(p))
    return _TABLE


class Spek:
    """The part of ``spekpy.Spek`` the synth engine uses, answered from the table."""

    def __init__(self, kvp: float = 100.0, th: float = 12.0, **kw: object) -> None:
        if kw:
            raise ValueError(f"tabulated spekpy: unsupported arguments {sorted(kw)}")
        self.kvp, self.th = float(kvp), float(th)
        self.filters: list[tuple[str, float]] = []

    def filter(self, material: str, thickness_mm: float) -> Spek:
        self.filters.append((material, float(thickness_mm)))
        return self

    def __deepcopy__(self, memo: dict) -> Spek:
        s = Spek(self.kvp, self.th)
        s.filters = list(self.filters)
        return s

    def get_spectrum(self) -> tuple[np.ndarray, np.ndarray]:
        key = _spectrum_key(self.kvp, self.th, tuple(self.filters))
        t = _table().arrays
        if f"k/{key}" not in t:
            raise KeyError(f"spectrum {key} is not in the physics table {_table().path}; extend KVPS/CU_MM")
        return t[f"k/{key}"].copy(), t[f"phi/{key}"].copy()


def mu_elam(element: str, energy_ev: np.ndarray | float) -> np.ndarray:
    """``xraydb.mu_elam`` at tabulated energies only (the bins of the tabulated spectra)."""
    tab = _table()
    col = tab.arrays.get(f"mu/{element}")
    if col is None:
        raise KeyError(f"element {element!r} is not in the physics table {tab.path}")
    e = np.atleast_1d(np.asarray(energy_ev, dtype=np.float64))
    try:
        idx = [tab.energy_index[float(v)] for v in e]
    except KeyError as err:
        raise KeyError(f"energy {err.args[0]} eV is not in the physics table {tab.path}") from None
    return col[idx]


SHIMS = {
    "spekpy": "from train.physics_tables import Spek  # tabulated stand-in (train/physics_tables.py)\n",
    "xraydb": "from train.physics_tables import mu_elam  # tabulated stand-in (train/physics_tables.py)\n",
}


def write_shims(site: str | Path) -> list[Path]:
    """The two one-line packages that make ``import spekpy`` / ``import xraydb`` serve the table."""
    out = []
    for name, text in SHIMS.items():
        d = Path(site) / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text(text)
        out.append(d / "__init__.py")
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m train.physics_tables TABLE.npz SHIM_SITE_DIR")
    print(write_tables(sys.argv[1]))
    write_shims(sys.argv[2])
