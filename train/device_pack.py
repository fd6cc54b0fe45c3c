"""What a lent GPU machine needs from here, packed within the device tool's 64 MiB working-tree limit.

``scripts/gpu_pack.sh`` drives this module. Bodies travel as one xz archive of their files with each CT
stored decompressed (``ct.nii``): xz on the raw voxels is 1.5-5x smaller than the gzip the body folders
use, and ``unpack_bodies`` writes ``ct.nii.gz`` back with the same voxels (checked by SHA-256 of the
decompressed file), so the synth engine reads identical bodies there. ``tree_budget`` counts what the
tool sends: tracked files, untracked files git does not ignore, and the carried folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MIB = 1024 * 1024
TREE_LIMIT = 64 * MIB  # the device tool's working-tree limit (tracked + untracked-not-ignored + carry)
FILE_BACK_LIMIT = 16 * MIB  # each file that comes back from $OUT
BODY_FILES = ("body.json", "structures.csv", "labels.nii.gz")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_bodies(bodies_root: Path, names: list[str], archive: Path, preset: int = 9) -> dict[str, str]:
    """Write ``names``' body folders into ``archive`` (tar.xz, CTs decompressed); returns name -> SHA-256
    of the decompressed CT, also stored in the archive as ``manifest.json``."""
    manifest: dict[str, str] = {}
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        for name in names:
            d = bodies_root / name
            for f in BODY_FILES:
                tar.add(d / f, arcname=f"{name}/{f}")
            raw = gzip.decompress((d / "ct.nii.gz").read_bytes())
            manifest[name] = _sha256(raw)
            info = tarfile.TarInfo(f"{name}/ct.nii")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    tmp.replace(archive)
    return manifest


def _gzip_ct(args: tuple[str, str]) -> str:
    folder, want = args
    raw_path = Path(folder) / "ct.nii"
    raw = raw_path.read_bytes()
    if _sha256(raw) != want:
        raise ValueError(f"{raw_path}: SHA-256 differs from the pack's manifest")
    with gzip.open(Path(folder) / "ct.nii.gz", "wb", compresslevel=1) as f:
        f.write(raw)
    raw_path.unlink()
    return folder


def unpack_bodies(archive: Path, dest: Path, workers: int = 8) -> list[str]:
    """Extract the archive into ``dest`` (a FLUOROSAM_BODIES root) and gzip each verified CT."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(dest, filter="data")
    manifest = json.loads((dest / "manifest.json").read_text())
    jobs = [(str(dest / n), sha) for n, sha in manifest.items()]
    with ProcessPoolExecutor(max(1, min(workers, len(jobs)))) as ex:
        list(ex.map(_gzip_ct, jobs))
    return sorted(manifest)


def _git_files(repo: Path, *args: str) -> list[Path]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", *args], capture_output=True, check=True)
    return [repo / p for p in out.stdout.decode().split("\0") if p]


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def tree_budget(repo: Path, carry: list[str]) -> dict[str, object]:
    """Bytes the device tool sends: tracked files (as on disk), untracked files git does not ignore,
    and each carried path; with the limit and what is left."""
    tracked = sum(p.stat().st_size for p in _git_files(repo) if p.is_file() and not p.is_symlink())
    untracked = sum(
        p.stat().st_size for p in _git_files(repo, "--others", "--exclude-standard") if p.is_file()
    )
    carried = {c: folder_bytes(repo / c) for c in carry}
    total = tracked + untracked + sum(carried.values())
    return {
        "tracked": tracked,
        "untracked_not_ignored": untracked,
        "carry": carried,
        "total": total,
        "limit": TREE_LIMIT,
        "left": TREE_LIMIT - total,
    }


def budget_lines(b: dict[str, object], detail: dict[str, int] | None = None) -> list[str]:
    rows = [("tracked files", b["tracked"]), ("untracked, not ignored", b["untracked_not_ignored"])]
    rows += [(f"carry {k}", v) for k, v in b["carry"].items()]  # type: ignore[union-attr]
    rows += [(f"  {k}", v) for k, v in (detail or {}).items()]
    rows += [("total", b["total"]), ("limit", b["limit"]), ("left", b["left"])]
    return [f"{name:<40} {int(v) / MIB:8.2f} MiB {int(v):>12} B" for name, v in rows]


def carry_detail(carry_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(carry_dir)): folder_bytes(p)
        for p in sorted(carry_dir.iterdir())
        if not p.name.startswith(".")
    }


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.device_pack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bodies", help="pack body folders into a tar.xz")
    p.add_argument("--root", required=True)
    p.add_argument("--archive", required=True)
    p.add_argument("--preset", type=int, default=9)
    p.add_argument("names", nargs="+")
    p = sub.add_parser("unpack", help="unpack a bodies archive into a FLUOROSAM_BODIES root")
    p.add_argument("--archive", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p = sub.add_parser("budget", help="print the working tree's size against the device limit")
    p.add_argument("--repo", default=".")
    p.add_argument("--carry", action="append", default=[])
    p.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.cmd == "bodies":
        m = pack_bodies(Path(a.root), a.names, Path(a.archive), a.preset)
        print(
            f"[device_pack] {len(m)} bodies -> {a.archive} ({Path(a.archive).stat().st_size / MIB:.2f} MiB)"
        )
    elif a.cmd == "unpack":
        names = unpack_bodies(Path(a.archive), Path(a.dest), a.workers)
        print(f"[device_pack] unpacked {len(names)} bodies into {a.dest}: {' '.join(names)}")
    else:
        b = tree_budget(Path(a.repo), a.carry)
        detail: dict[str, int] = {}
        for c in a.carry:
            if (Path(a.repo) / c).is_dir():
                detail.update({f"{c}/{k}": v for k, v in carry_detail(Path(a.repo) / c).items()})
        print("\n".join(budget_lines(b, detail)))
        if a.json:
            Path(a.json).write_text(json.dumps({**b, "detail": detail}, indent=1))
        if int(b["left"]) < 0:  # type: ignore[arg-type]
            print(f"[device_pack] over the device limit by {-int(b['left']) / MIB:.2f} MiB")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
