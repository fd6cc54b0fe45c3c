"""Training augmentations, applied to the raw image before the node's deterministic preprocessing.

Two families. FluoroSAM's own list (negative log, inversion, window choice, CLAHE, blur/sharpen,
contrast, non-uniform contrast, dropout, crop/zoom/rotation, collimator shapes) makes the model
indifferent to how a DRR was rendered. The sim-to-real family (CR/DX tone curves, anti-scatter
grid lines, text burn-ins, image-intensifier vignetting and pincushion/S distortion, over-exposed
regions that bloom into the anatomy next to them, detector noise) imitates what real
radiographs carry and synthetic ones lack; the real chest set is never used to tune them.

Everything works on a float32 image in [0, 1] and a bool mask stack [N, H, W]. Geometric steps
move image and masks with one matrix so targets stay aligned; steps that hide anatomy
(collimator, crop) also clear the masks there, because the model cannot see what is outside
the field of view and must not be taught to hallucinate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges. ``strength`` 0 turns every step off (evaluation, tests)."""

    strength: float = 1.0
    p_neglog: float = 0.15
    p_invert: float = 0.5
    p_window: float = 0.3
    p_clahe: float = 0.25
    p_blur: float = 0.25
    p_sharpen: float = 0.2
    p_contrast: float = 0.5
    p_nonuniform: float = 0.3
    p_dropout: float = 0.15
    p_affine: float = 0.8
    p_collimator: float = 0.3
    p_tone_curve: float = 0.5
    p_grid: float = 0.15
    p_text: float = 0.3
    p_vignette: float = 0.25
    p_noise: float = 0.4
    p_distortion: float = 0.2
    p_saturation: float = 0.2
    max_rotation_deg: float = 15.0
    zoom_range: tuple[float, float] = (0.8, 1.3)
    max_aspect_change: float = 0.2


def _p(rng: np.random.Generator, p: float, cfg: AugmentConfig) -> bool:
    return bool(rng.random() < p * cfg.strength)


def normalize01(img: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float32 (a constant image becomes zeros)."""
    img = img.astype(np.float32, copy=False)
    lo, hi = float(img.min()), float(img.max())
    if hi - lo < 1e-12:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


# -- intensity: FluoroSAM's list -----------------------------------------------------------------
def negative_log(img: np.ndarray) -> np.ndarray:
    """Show the image as -log(intensity), as a raw detector read-out would be displayed."""
    return normalize01(-np.log(np.clip(img, 1e-3, 1.0)))


def random_window(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clip to a random quantile window: scanners and users pick different windows."""
    lo_q = rng.uniform(0.0, 0.15)
    hi_q = rng.uniform(0.85, 1.0)
    lo, hi = np.quantile(img[::4, ::4], [lo_q, hi_q])
    if hi - lo < 1e-6:
        return img
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def clahe(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation, common in DX post-processing."""
    u8 = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    tiles = int(rng.integers(4, 12))
    op = cv2.createCLAHE(clipLimit=float(rng.uniform(1.0, 4.0)), tileGridSize=(tiles, tiles))
    return op.apply(u8).astype(np.float32) / 255.0


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(0.3, 2.0)) * max(img.shape) / 256.0
    return cv2.GaussianBlur(img, (0, 0), sigma)


def sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking: edge enhancement is standard on CR/DX consoles."""
    sigma = float(rng.uniform(1.0, 4.0)) * max(img.shape) / 256.0
    amount = float(rng.uniform(0.3, 1.5))
    soft = cv2.GaussianBlur(img, (0, 0), sigma)
    return np.clip(img + amount * (img - soft), 0.0, 1.0).astype(np.float32)


def contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = float(np.exp(rng.uniform(-0.5, 0.5)))
    gain = float(rng.uniform(0.7, 1.3))
    bias = float(rng.uniform(-0.15, 0.15))
    out = np.power(np.clip(img, 0, 1), gamma) * gain + bias
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """A random smooth field in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def nonuniform_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spatially varying gain/offset: heel effect, uneven exposure, scatter haze."""
    gain = 1.0 + float(rng.uniform(0.1, 0.4)) * smooth_field(img.shape, rng, int(rng.integers(2, 6)))
    offset = float(rng.uniform(0.0, 0.15)) * smooth_field(img.shape, rng, int(rng.integers(2, 6)))
    return np.clip(img * gain + offset, 0.0, 1.0).astype(np.float32)


def coarse_dropout(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blank rectangles: occluders (lead aprons, monitors) the masks still cover underneath."""
    out = img.copy()
    h, w = img.shape
    for _ in range(int(rng.integers(1, 6))):
        dh, dw = int(rng.uniform(0.03, 0.15) * h), int(rng.uniform(0.03, 0.15) * w)
        y, x = int(rng.integers(0, max(1, h - dh))), int(rng.integers(0, max(1, w - dw)))
        out[y : y + dh, x : x + dw] = float(rng.choice([0.0, 1.0, rng.uniform()]))
    return out


# -- intensity: sim-to-real --------------------------------------------------------------------
def tone_curve(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A CR/DX-like characteristic curve: sigmoid (film-like S-curve) or log-ish shoulder."""
    if rng.random() < 0.6:
        k = float(rng.uniform(3.0, 10.0))
        c = float(rng.uniform(0.35, 0.65))
        s = 1.0 / (1.0 + np.exp(-k * (img - c)))
        lo, hi = 1.0 / (1.0 + np.exp(k * c)), 1.0 / (1.0 + np.exp(-k * (1.0 - c)))
        return ((s - lo) / (hi - lo)).astype(np.float32)
    a = float(rng.uniform(2.0, 20.0))
    return (np.log1p(a * img) / np.log1p(a)).astype(np.float32)


def grid_lines(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Faint periodic stripes of an anti-scatter grid (often aliased to a few-pixel period)."""
    h, w = img.shape
    period = float(rng.uniform(2.2, 8.0))
    amp = float(rng.uniform(0.01, 0.05))
    phase = float(rng.uniform(0, 2 * np.pi))
    coord = np.arange(w if rng.random() < 0.5 else h, dtype=np.float32)
    wave = amp * np.sin(2 * np.pi * coord / period + phase)
    stripes = wave[None, :] if wave.shape[0] == w else wave[:, None]
    return np.clip(img + stripes, 0.0, 1.0).astype(np.float32)


_BURN_IN_WORDS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "LAT", "CR", "DX", "12:04", "ICU")


def text_burn_in(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Side markers and annotation text burned into the pixels, bright or dark, near the edges."""
    out = img.copy()
    h, w = img.shape
    for _ in range(int(rng.integers(1, 4))):
        word = str(rng.choice(_BURN_IN_WORDS))
        scale = float(rng.uniform(0.4, 1.6)) * max(h, w) / 512.0
        thickness = max(1, round(scale * 2))
        (tw, th), _ = cv2.getTextSize(word, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        edge = rng.random() < 0.8
        if edge:
            x = int(rng.choice([rng.uniform(0, 0.15), rng.uniform(0.7, 0.95)]) * w)
            y = int(rng.choice([rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.98)]) * h)
        else:
            x, y = int(rng.uniform(0, 0.9) * w), int(rng.uniform(0.1, 0.95) * h)
        x = min(max(0, x), max(0, w - tw))
        y = min(max(th, y), h - 1)
        value = 1.0 if rng.random() < 0.7 else 0.0
        ink = np.zeros((h, w), np.uint8)  # drawn as 8-bit coverage, then blended into the float image
        cv2.putText(ink, word, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
        alpha = ink.astype(np.float32) / 255.0
        out = out * (1 - alpha) + value * alpha
    return out.astype(np.float32)


def vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Image-intensifier brightness fall-off towards the rim (plus slight pincushion-free haze)."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    r2 = ((yy - cy) / (0.5 * h)) ** 2 + ((xx - cx) / (0.5 * w)) ** 2
    strength = float(rng.uniform(0.1, 0.5))
    fall = 1.0 - strength * np.clip(r2, 0, 2) / 2.0
    if rng.random() < 0.5:  # bright-centre display (bone bright) or dark-centre: both occur
        return np.clip(img * fall, 0, 1).astype(np.float32)
    return np.clip(1.0 - (1.0 - img) * fall, 0, 1).astype(np.float32)


def detector_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = float(rng.uniform(0.005, 0.04))
    noise = rng.standard_normal(img.shape).astype(np.float32) * sigma
    if rng.random() < 0.5:  # correlated noise of a blurred detector
        noise = cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(0.5, 1.5))) * 1.5
    return np.clip(img + noise, 0, 1).astype(np.float32)


# -- geometry --------------------------------------------------------------------------------------
def random_affine(shape: tuple[int, int], rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """2x3 matrix: rotation about a jittered centre, zoom, mild aspect change and shift."""
    h, w = shape
    angle = float(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    zoom = float(np.exp(rng.uniform(np.log(cfg.zoom_range[0]), np.log(cfg.zoom_range[1]))))
    aspect = float(np.exp(rng.uniform(-cfg.max_aspect_change, cfg.max_aspect_change)))
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    s = np.diag([zoom * np.sqrt(aspect), zoom / np.sqrt(aspect)])
    m[:, :2] = s @ m[:, :2]
    centre = np.array([w / 2.0, h / 2.0])
    m[:, 2] = centre - m[:, :2] @ centre
    m[:, 2] += rng.uniform(-0.1, 0.1, size=2) * np.array([w, h])
    return m.astype(np.float64)


def warp(
    img: np.ndarray, masks: np.ndarray, m: np.ndarray, fill: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply one affine to image (linear) and masks (nearest); also returns the valid-pixel map."""
    h, w = img.shape
    out = cv2.warpAffine(
        img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
    )
    valid = cv2.warpAffine(np.ones((h, w), np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    warped = np.zeros_like(masks)
    for i in range(masks.shape[0]):
        if masks[i].any():
            warped[i] = cv2.warpAffine(masks[i].astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    return out, warped, valid


def intensifier_maps(shape: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps of an image intensifier's distortion: pincushion plus a twist (S-distortion).

    The curved input phosphor magnifies the rim (radius r shows the scene at r / (1 + k r²), k up to
    0.15 at the field's edge), and the Earth's field in the electron optics turns the image by an
    angle growing with radius (a few degrees at the rim). Both are smooth, so one map moves image and
    masks together; the synthetic engine renders the same look for its own II views."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = (w - 1) / 2.0 + w * rng.uniform(-0.05, 0.05), (h - 1) / 2.0 + h * rng.uniform(-0.05, 0.05)
    half = 0.5 * max(h, w)
    dx, dy = (xx - cx) / half, (yy - cy) / half
    r2 = dx * dx + dy * dy
    k = float(rng.uniform(0.03, 0.15))
    twist = np.deg2rad(float(rng.uniform(-4.0, 4.0))) * r2
    scale = 1.0 / (1.0 + k * r2)
    c, s = np.cos(twist), np.sin(twist)
    sx, sy = (c * dx - s * dy) * scale, (s * dx + c * dy) * scale
    return (cx + sx * half).astype(np.float32), (cy + sy * half).astype(np.float32)


def remap(
    img: np.ndarray, masks: np.ndarray, maps: tuple[np.ndarray, np.ndarray], fill: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``warp`` for a dense map: image linear, masks nearest, plus the valid-pixel map."""
    mx, my = maps
    out = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    valid = cv2.remap(np.ones(img.shape, np.uint8), mx, my, cv2.INTER_NEAREST) > 0
    moved = np.zeros_like(masks)
    for i in range(masks.shape[0]):
        if masks[i].any():
            moved[i] = cv2.remap(masks[i].astype(np.uint8), mx, my, cv2.INTER_NEAREST) > 0
    return out, moved, valid


def over_exposure(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturated regions next to the anatomy: the unattenuated beam clips the detector and blooms.

    Where the image is brightest (thin tissue or direct beam, in whichever convention the image is)
    it clips at a level drawn from the top of its range, and the clipped area glows a few pixels into
    its surroundings, as an intensifier's or an over-driven flat panel's does. The anatomy is still
    there under the glow's edge; the masks stay as they are."""
    level = float(np.quantile(img, rng.uniform(0.7, 0.95)))
    if level <= 1e-6:
        return img
    clipped = np.minimum(img / level, 1.0)
    sat = (clipped >= 1.0).astype(np.float32)
    sigma = float(rng.uniform(1.0, 4.0)) * max(img.shape) / 256.0
    glow = cv2.GaussianBlur(sat, (0, 0), sigma)
    return (clipped + (1.0 - clipped) * glow).astype(np.float32)  # light adds; never past 1


def collimator(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Field-of-view map of a random collimator: circle (image intensifier), rectangle or polygon."""
    h, w = shape
    fov = np.zeros((h, w), np.uint8)
    kind = rng.choice(["circle", "rect", "poly"], p=[0.4, 0.35, 0.25])
    if kind == "circle":
        r = int(min(h, w) * rng.uniform(0.42, 0.7))
        c = (int(w * rng.uniform(0.4, 0.6)), int(h * rng.uniform(0.4, 0.6)))
        cv2.circle(fov, c, r, 1, -1)
    elif kind == "rect":
        x0, y0 = int(w * rng.uniform(0, 0.2)), int(h * rng.uniform(0, 0.2))
        x1, y1 = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-10, 10)), 1.0)
        pts = (corners @ rot[:, :2].T + rot[:, 2]).astype(np.int32)
        cv2.fillPoly(fov, [pts], 1)
    else:
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.4, 0.65, n) * min(h, w)
        pts = np.stack([w / 2 + rad * np.cos(ang), h / 2 + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(fov, [pts], 1)
    return fov > 0


def augment(
    img: np.ndarray, masks: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One random augmentation of (image [H, W] in [0, 1], masks [N, H, W] bool).

    The order follows how an image is made: geometry and collimation first (what the detector
    sees), then the read-out chain (log, tone curve, grid, noise), then display processing
    (window, CLAHE, sharpening, burn-ins), and finally inversion, which flips the convention.
    """
    img = normalize01(img)
    masks = masks.astype(bool, copy=True)
    if _p(rng, cfg.p_affine, cfg):
        img, masks, valid = warp(img, masks, random_affine(img.shape, rng, cfg), fill=0.0)
        masks &= valid[None]
    if _p(rng, cfg.p_distortion, cfg):
        img, masks, valid = remap(img, masks, intensifier_maps(img.shape, rng), fill=0.0)
        masks &= valid[None]
    if _p(rng, cfg.p_saturation, cfg):
        img = over_exposure(img, rng)
    if _p(rng, cfg.p_collimator, cfg):
        fov = collimator(img.shape, rng)
        fill = float(rng.choice([0.0, 1.0, rng.uniform(0.0, 0.3)]))
        img = np.where(fov, img, fill).astype(np.float32)
        masks &= fov[None]
    if _p(rng, cfg.p_neglog, cfg):
        img = negative_log(img)
    if _p(rng, cfg.p_tone_curve, cfg):
        img = tone_curve(img, rng)
    if _p(rng, cfg.p_nonuniform, cfg):
        img = nonuniform_contrast(img, rng)
    if _p(rng, cfg.p_vignette, cfg):
        img = vignette(img, rng)
    if _p(rng, cfg.p_grid, cfg):
        img = grid_lines(img, rng)
    if _p(rng, cfg.p_noise, cfg):
        img = detector_noise(img, rng)
    if _p(rng, cfg.p_blur, cfg):
        img = blur(img, rng)
    if _p(rng, cfg.p_contrast, cfg):
        img = contrast(img, rng)
    if _p(rng, cfg.p_window, cfg):
        img = random_window(img, rng)
    if _p(rng, cfg.p_clahe, cfg):
        img = clahe(img, rng)
    if _p(rng, cfg.p_sharpen, cfg):
        img = sharpen(img, rng)
    if _p(rng, cfg.p_dropout, cfg):
        img = coarse_dropout(img, rng)
    if _p(rng, cfg.p_text, cfg):
        img = text_burn_in(img, rng)
    if _p(rng, cfg.p_invert, cfg):
        img = 1.0 - img
    return np.clip(img, 0.0, 1.0).astype(np.float32), masks
