"""X-ray image formation from per-material line integrals, after DeepDRR's model.

Polychromatic Beer–Lambert over a binned tube spectrum (spekpy), mass attenuation from xraydb (``materials``),
an energy-integrating detector, a kernel scatter estimate, Poisson quantum noise, detector blur, electronic
noise, negative log, a circular image-intensifier field and randomised window/contrast. Everything after
the line integrals is a few (E x M) einsums and 2D convolutions, so it costs milliseconds.

Detector *looks* (``sample_look_physics``): an image intensifier (round field, vignetting, veiling glare,
softer image; its pincushion/S-distortion is geometric and lives in the ``Camera``), a flat panel (square,
sharp) and a radiograph (DR plate behind a grid). Any of them may carry collimation: an iris (a smaller
circle) and/or rectangular shutters (rotatable), whose lead leaves pass only a few per cent of the beam so
the covered area shows as a near-uniform band; masks are kept only in the open field (``collimator_mask``).
Over-exposed borders: the detector saturates where the beam misses the body (direct beam) and, with
glare, in the thin tissue next to it, which burns out the skin line as on real C-arm images.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from train.synth.materials import attenuation_table


@lru_cache(maxsize=16)
def _tube_spectrum(kvp: int, al_mm: float) -> Any:
    """The unfiltered-by-copper spekpy model of one tube voltage: the expensive part (about a second)."""
    import spekpy  # lazy: heavy import

    s = spekpy.Spek(kvp=float(kvp), th=12.0)
    s.filter("Al", al_mm)
    return s


@lru_cache(maxsize=64)
def binned_spectrum(
    kvp: int, n_bins: int = 10, al_mm: float = 2.5, cu_mm: float = 0.0
) -> tuple[np.ndarray, ...]:
    """(energies keV, weights) of a tungsten-anode spectrum in ``n_bins`` energy bins.

    Weights are fluence × energy (energy-integrating detector), normalised to sum to 1; each bin's energy is
    its fluence-weighted mean. Building spekpy's model costs about a second per tube voltage, so it is built
    once per kVp and the copper filter is applied to a copy (milliseconds; identical to filtering in place).
    """
    s = _tube_spectrum(int(kvp), float(al_mm))
    if cu_mm > 0:
        s = copy.deepcopy(s)
        s.filter("Cu", cu_mm)
    k, phi = s.get_spectrum()
    edges = np.linspace(max(10.0, float(k.min())), float(kvp), n_bins + 1)
    e_out, w_out = [], []
    for lo, hi in itertools.pairwise(edges):
        m = (k >= lo) & (k < hi)
        if not m.any() or phi[m].sum() <= 0:
            continue
        e_out.append(float((k[m] * phi[m]).sum() / phi[m].sum()))
        w_out.append(float((k[m] * phi[m]).sum()))
    w = np.array(w_out)
    return np.array(e_out), w / w.sum()


@dataclass
class PhysicsParams:
    """Per-image acquisition and detector parameters; stored with each image."""

    kvp: int = 90
    cu_mm: float = 0.0
    photons_per_pixel: float = 2e4
    electronic_noise: float = 3.0  # counts (std)
    blur_px: float = 0.7
    scatter_fraction: float = 0.2
    scatter_sigma_px: float = 25.0
    collimator_radius: float | None = 0.48  # fraction of image width; None = no collimator
    collimator_center: tuple[float, float] = (0.5, 0.5)
    gamma: float = 1.0
    window_lo: float = 0.01  # percentiles of the neglog image mapped to 0 and 1
    window_hi: float = 0.995
    invert: bool = False
    look: str = (
        "default"  # "image_intensifier" | "flat_panel" | "radiograph" (sample_look_physics) or default
    )
    vignetting: float = 0.0  # fraction of the signal lost at the field's edge (radius = half the width)
    iris_radius: float | None = None  # iris collimator radius, fraction of width (about collimator_center)
    # Rectangular shutters: open where x' in [x0, x1] and y' in [y0, y1] (fractions of width/height) in the
    # image frame turned by shutter_angle_deg about collimator_center; None = none.
    shutters: tuple[float, float, float, float] | None = None
    shutter_angle_deg: float = 0.0
    leaf_transmission: float = 0.005  # fraction of the primary that passes iris and shutter leaves
    glare_fraction: float = 0.0  # image-intensifier veiling glare: share of the signal spread widely
    glare_sigma_px: float = 20.0
    saturation: float | None = None  # detector saturates at this fraction of the unattenuated signal
    # Automatic exposure control: the dose is set so the centre of the field (a disc of a quarter of the
    # width) gets this many counts at its median; photons_per_pixel is then ignored. None: no AEC.
    aec_counts: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sample_physics(rng: np.random.Generator, size: int) -> PhysicsParams:
    """Randomised acquisition: kVp, filtration, dose, blur, scatter, collimator, intensity and contrast."""
    kvp = int(rng.choice([60, 70, 80, 90, 100, 110, 120]))
    return PhysicsParams(
        kvp=kvp,
        cu_mm=float(rng.choice([0.0, 0.1, 0.2, 0.3])),
        photons_per_pixel=float(10 ** rng.uniform(3.3, 5.0)),
        electronic_noise=float(rng.uniform(0.0, 6.0)),
        blur_px=float(rng.uniform(0.3, 1.2) * size / 256),
        scatter_fraction=float(rng.uniform(0.05, 0.4)),
        scatter_sigma_px=float(rng.uniform(15.0, 40.0) * size / 256),
        collimator_radius=float(rng.uniform(0.45, 0.6)) if rng.random() < 0.6 else None,
        collimator_center=(float(rng.normal(0.5, 0.02)), float(rng.normal(0.5, 0.02))),
        gamma=float(np.exp(rng.normal(0.3, 0.3))),
        window_lo=float(rng.uniform(0.02, 0.3)),
        window_hi=float(rng.uniform(0.97, 1.0)),
    )


def sample_radiograph_physics(rng: np.random.Generator, size: int) -> PhysicsParams:
    """Acquisition of a chest radiograph (CR/DX): higher kVp, an anti-scatter grid, no round collimator.

    Erect PA chests are taken at 100-125 kVp behind a grid (less scatter), bedside AP ones at 80-100 kVp
    often without one; the field is rectangular, so there is no image-intensifier circle.
    """
    kvp = int(rng.choice([80, 90, 100, 110, 120]))
    return PhysicsParams(
        kvp=kvp,
        cu_mm=float(rng.choice([0.0, 0.1, 0.2])),
        photons_per_pixel=float(10 ** rng.uniform(3.8, 5.0)),
        electronic_noise=float(rng.uniform(0.0, 3.0)),
        blur_px=float(rng.uniform(0.3, 1.0) * size / 256),
        scatter_fraction=float(rng.uniform(0.03, 0.3)),
        scatter_sigma_px=float(rng.uniform(15.0, 40.0) * size / 256),
        collimator_radius=None,
        collimator_center=(0.5, 0.5),
        gamma=float(np.exp(rng.normal(0.3, 0.3))),
        window_lo=float(rng.uniform(0.02, 0.3)),
        window_hi=float(rng.uniform(0.97, 1.0)),
    )


LOOKS = ("image_intensifier", "flat_panel", "radiograph")


def _sample_collimation(rng: np.random.Generator, p_iris: float, p_shutters: float) -> dict[str, Any]:
    """Iris and/or rectangular shutters: which, how far closed, and at what angle."""
    out: dict[str, Any] = {}
    if rng.random() < p_iris:
        out["iris_radius"] = float(rng.uniform(0.25, 0.45))
    if rng.random() < p_shutters:
        if rng.random() < 0.5:  # one pair of leaves (a slit), else both pairs
            lo, hi = float(rng.uniform(0.08, 0.35)), float(rng.uniform(0.65, 0.92))
            x0, x1, y0, y1 = lo, hi, -1.0, 2.0
        else:
            x0, x1 = float(rng.uniform(0.03, 0.3)), float(rng.uniform(0.7, 0.97))
            y0, y1 = float(rng.uniform(0.03, 0.3)), float(rng.uniform(0.7, 0.97))
        out["shutters"] = (x0, x1, y0, y1)
        if rng.random() < 0.7:  # square to the image, as the leaves usually are
            out["shutter_angle_deg"] = float(rng.choice([0.0, 90.0]) + rng.normal(0.0, 4.0))
        else:
            out["shutter_angle_deg"] = float(rng.uniform(-90.0, 90.0))
    if out:  # lead leaves pass well under 1 % of the primary; what shows under them is mostly scatter
        out["leaf_transmission"] = float(rng.uniform(0.002, 0.01))
    return out


def sample_look_physics(
    rng: np.random.Generator,
    size: int,
    look: str,
    kvp: tuple[int, int] = (60, 120),
) -> PhysicsParams:
    """Randomised acquisition with the detector look of an image intensifier, a flat panel or a radiograph.

    * ``image_intensifier``: round field (radius 0.44-0.5 of the width), vignetting 5-25 %, a softer image
      (blur 0.8-1.8 px at 256²), veiling glare, and direct-beam saturation in half the images;
    * ``flat_panel``: no round field, sharp (blur 0.3-0.8 px), little vignetting, saturation less often;
    * ``radiograph``: a DR plate behind a grid (scatter 3-20 %), sharp, no round field, usually collimated.

    ``kvp`` bounds the tube voltage (extremities are taken at 50-70 kVp, trunks at 70-120). All looks use
    automatic exposure control, as C-arms and DR rooms do: a pelvis gets more dose than a hand, so both come
    out with a similar noise level (median counts at the field's centre: II 10^2.8-3.8, flat panel
    10^3.1-4.2, radiograph 10^3.6-4.6).
    """
    if look not in LOOKS:
        raise ValueError(f"unknown detector look {look!r}; choose from {', '.join(LOOKS)}")
    volts = [v for v in range(50, 130, 5) if kvp[0] <= v <= kvp[1]] or [int(kvp[0])]
    sc = size / 256
    common = {
        "kvp": int(rng.choice(volts)),
        "gamma": float(np.exp(rng.normal(0.3, 0.3))),
        "window_lo": float(rng.uniform(0.02, 0.3)),
        "window_hi": float(rng.uniform(0.97, 1.0)),
        "look": look,
    }
    if look == "image_intensifier":
        return PhysicsParams(
            cu_mm=float(rng.choice([0.0, 0.1, 0.2, 0.3])),
            aec_counts=float(10 ** rng.uniform(2.8, 3.8)),
            electronic_noise=float(rng.uniform(1.0, 6.0)),
            blur_px=float(rng.uniform(0.8, 1.8) * sc),
            scatter_fraction=float(rng.uniform(0.1, 0.4)),
            scatter_sigma_px=float(rng.uniform(15.0, 40.0) * sc),
            collimator_radius=float(rng.uniform(0.44, 0.5)),
            collimator_center=(float(rng.normal(0.5, 0.01)), float(rng.normal(0.5, 0.01))),
            vignetting=float(rng.uniform(0.05, 0.25)),
            glare_fraction=float(rng.uniform(0.02, 0.12)),
            glare_sigma_px=float(rng.uniform(8.0, 25.0) * sc),
            saturation=float(rng.uniform(0.5, 0.9)) if rng.random() < 0.5 else None,
            **_sample_collimation(rng, p_iris=0.3, p_shutters=0.3),
            **common,
        )
    if look == "flat_panel":
        return PhysicsParams(
            cu_mm=float(rng.choice([0.0, 0.1, 0.2, 0.3])),
            aec_counts=float(10 ** rng.uniform(3.1, 4.2)),
            electronic_noise=float(rng.uniform(0.0, 4.0)),
            blur_px=float(rng.uniform(0.3, 0.8) * sc),
            scatter_fraction=float(rng.uniform(0.05, 0.35)),
            scatter_sigma_px=float(rng.uniform(15.0, 40.0) * sc),
            collimator_radius=None,
            vignetting=float(rng.uniform(0.0, 0.08)),
            saturation=float(rng.uniform(0.6, 0.95)) if rng.random() < 0.35 else None,
            **_sample_collimation(rng, p_iris=0.2, p_shutters=0.45),
            **common,
        )
    return PhysicsParams(
        cu_mm=float(rng.choice([0.0, 0.1, 0.2])),
        aec_counts=float(10 ** rng.uniform(3.6, 4.6)),
        electronic_noise=float(rng.uniform(0.0, 3.0)),
        blur_px=float(rng.uniform(0.3, 0.9) * sc),
        scatter_fraction=float(rng.uniform(0.03, 0.2)),
        scatter_sigma_px=float(rng.uniform(15.0, 40.0) * sc),
        collimator_radius=None,
        saturation=float(rng.uniform(0.7, 0.97)) if rng.random() < 0.2 else None,
        **_sample_collimation(rng, p_iris=0.0, p_shutters=0.6),
        **common,
    )


def _gauss_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0.05:
        return img
    r = max(1, int(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    i = img[None, None]
    i = F.conv2d(F.pad(i, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    i = F.conv2d(F.pad(i, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return i[0, 0]


def _field_coords(h: int, w: int, params: PhysicsParams, device: torch.device | str):
    yy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    cx, cy = params.collimator_center
    return xx[None] - cx, yy[:, None] - cy


def detector_field(h: int, w: int, params: PhysicsParams, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where the detector makes an image at all: an image intensifier's round field (all True without one)."""
    if params.collimator_radius is None:
        return torch.ones(h, w, dtype=torch.bool, device=device)
    dx, dy = _field_coords(h, w, params, device)
    return (dx**2 + dy**2) <= params.collimator_radius**2


def collimator_mask(
    h: int, w: int, params: PhysicsParams, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The open field of view: the round field, less what the iris and the shutters cover.

    Annotations are kept only here; the leaves' shadow is imaged (as a near-uniform band) but not labelled.
    """
    fov = detector_field(h, w, params, device)
    if params.iris_radius is None and params.shutters is None:
        return fov
    dx, dy = _field_coords(h, w, params, device)
    if params.iris_radius is not None:
        fov = fov & ((dx**2 + dy**2) <= params.iris_radius**2)
    if params.shutters is not None:
        a = np.deg2rad(params.shutter_angle_deg)
        xr = float(np.cos(a)) * dx + float(np.sin(a)) * dy + 0.5
        yr = -float(np.sin(a)) * dx + float(np.cos(a)) * dy + 0.5
        x0, x1, y0, y1 = params.shutters
        fov = fov & (xr >= x0) & (xr <= x1) & (yr >= y0) & (yr <= y1)
    return fov


def polychromatic_transmission(line_integrals: torch.Tensor, kvp: int, cu_mm: float = 0.0) -> torch.Tensor:
    """Fraction of detector energy transmitted per pixel, Σ_E w_E exp(-Σ_m μ_m(E) L_m)."""
    energies, weights = binned_spectrum(int(kvp), cu_mm=float(cu_mm))
    mu = torch.as_tensor(attenuation_table(energies), dtype=torch.float32, device=line_integrals.device)
    w = torch.as_tensor(weights, dtype=torch.float32, device=line_integrals.device)
    att = torch.einsum("em,mhw->ehw", mu, line_integrals)
    return torch.einsum("e,ehw->hw", w, torch.exp(-att))


def form_image(
    line_integrals: torch.Tensor, params: PhysicsParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Line integrals (M, H, W) -> displayed image in [0, 1] (float32; bone bright unless ``invert``)."""
    prim = polychromatic_transmission(line_integrals, params.kvp, params.cu_mm)
    return detector_image(prim, params, generator)


def detector_image(
    prim: torch.Tensor, params: PhysicsParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Primary transmission (H, W) -> displayed image: scatter, noise, blur, neglog, collimator, window.

    Split from ``form_image`` so a backend with its own attenuation model (deepdrr) shares everything the
    detector does after the patient.
    """
    h, w = prim.shape
    field = detector_field(h, w, params, prim.device)
    fov = collimator_mask(h, w, params, prim.device)
    if params.iris_radius is not None or params.shutters is not None:
        # Leaves sit at the source: they cut the primary, and with it the scatter made under them.
        prim = torch.where(fov, prim, prim * params.leaf_transmission)
    # Scatter: attenuation events spread by a broad kernel (computed at 1/4 size: it is smooth anyway).
    src = (prim * (-torch.log(prim.clamp_min(1e-6))))[None, None]
    small = F.avg_pool2d(src, 4)
    small = _gauss_blur(small[0, 0], params.scatter_sigma_px / 4)[None, None]
    scatter = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    scatter = scatter * (params.scatter_fraction * prim.mean() / scatter.mean().clamp_min(1e-9))
    n_ph = params.photons_per_pixel
    if params.aec_counts is not None:
        dx, dy = _field_coords(h, w, params, prim.device)
        centre = fov & ((dx**2 + dy**2) <= 0.25**2)
        ref = prim[centre] if bool(centre.any()) else prim[fov] if bool(fov.any()) else prim.reshape(-1)
        n_ph = float(np.clip(params.aec_counts / max(float(ref.median()), 1e-9), 1e2, 1e8))
    expected = (prim + scatter) * n_ph
    if params.vignetting > 0:
        dx, dy = _field_coords(h, w, params, prim.device)
        expected = expected * (1.0 - params.vignetting * ((dx**2 + dy**2) / 0.25).clamp_max(1.0))
    counts = torch.poisson(expected, generator=generator)
    counts = _gauss_blur(counts, params.blur_px)
    if params.glare_fraction > 0:
        # Veiling glare: light scattered in the intensifier's output stage bleeds bright areas into dark ones.
        small = F.avg_pool2d(counts[None, None], 4)[0, 0]
        wide = _gauss_blur(small, params.glare_sigma_px / 4)[None, None]
        wide = F.interpolate(wide, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        counts = (1.0 - params.glare_fraction) * counts + params.glare_fraction * wide
    noise = torch.randn(counts.shape, generator=generator, device=counts.device) * params.electronic_noise
    counts = counts + noise
    if params.saturation is not None:
        counts = counts.clamp_max(params.saturation * n_ph)
    neglog = -torch.log((counts / n_ph).clamp_min(1.0 / n_ph))
    vals = neglog[fov]
    if vals.numel() > 16:
        lo, hi = torch.quantile(
            vals[:: max(1, vals.numel() // 20000)], torch.tensor([params.window_lo, params.window_hi])
        )
    else:
        lo, hi = neglog.min(), neglog.max()
    img = ((neglog - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0) ** params.gamma
    if params.invert:
        img = 1.0 - img
    return torch.where(field, img, torch.zeros_like(img)).float()
