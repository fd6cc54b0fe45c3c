"""Decode + ingest time of one 1024x1024 X-ray frame in every transfer syntax (issue 20).

"Ingest" is what the Storage SCP does with a received object before the frame joins the
stream: parse the data set, check the pixel data (frame count, stream markers), decode, and run
the display pipeline (``sources.dicom_frames.dataset_frames``). "Decode" is pydicom's
``pixel_array`` alone, with the first decoder plugin the node would use.

The frame is the real WG04 CR image RG3 (centre 1024x1024, 10-bit) from ``../shared`` when it
is there (``--image`` picks another DICOM file), encoded by the same tools the tests use:
dcmtk for the uncompressed, JPEG, JPEG-LS and RLE syntaxes, OpenJPEG (through pydicom) for
JPEG 2000, OpenJPH's ``ojph_compress`` for HTJ2K. A syntax whose encoder is not installed is
reported as skipped, never guessed.
"""

from __future__ import annotations

import io
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..dicom_codecs import SYNTAXES, SyntaxInfo, decoder_plugins

_DCMTK = {
    "implicit": ["dcmconv", "+ti"],
    "explicit": ["dcmconv", "+te"],
    "deflated": ["dcmconv", "+td"],
    "big_endian": ["dcmconv", "+tb"],
    "jpeg_baseline": ["dcmcjpeg", "+eb"],
    "jpeg_extended": ["dcmcjpeg", "+ee"],
    "jpeg_lossless": ["dcmcjpeg", "+el"],
    "jpeg_lossless_sv1": ["dcmcjpeg", "+e1"],
    "jpegls_lossless": ["dcmcjpls", "+el"],
    "jpegls_near_lossless": ["dcmcjpls", "+en"],
    "rle": ["dcmcrle"],
}
_DEFAULT_IMAGE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom" / "RG3_J2KR.dcm"


def _source_frame(image: Path | None, size: int, work: Path) -> tuple[Path, Path, str]:
    """Write the 16-bit source and an 8-bit copy (for JPEG Baseline) as Explicit VR LE files."""
    import pydicom

    path = image or _DEFAULT_IMAGE
    if path.is_file():
        ds = pydicom.dcmread(path)
        ds.decompress()
        arr = ds.pixel_array
        origin = f"{path.name}, centre {size}x{size}"
    else:  # no shared data: a smooth synthetic 10-bit frame with noise, so it is still compressible
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid

        yy, xx = np.mgrid[0:size, 0:size] / size
        rng = np.random.default_rng(0)
        arr = (400 + 300 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 8, (size, size))).clip(0, 1023)
        arr = arr.astype(np.uint16)
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.SamplesPerPixel, ds.PhotometricInterpretation = "CR", 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 10, 9, 0
        origin = f"synthetic {size}x{size} 10-bit (no {path})"
    if arr.shape[0] < size or arr.shape[1] < size:
        raise SystemExit(f"bench-decode: {path} is {arr.shape}, smaller than {size}x{size}")
    r0, c0 = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    crop = np.ascontiguousarray(arr[r0 : r0 + size, c0 : c0 + size])
    ds.Rows = ds.Columns = size
    ds.PixelData = crop.tobytes()
    src16 = work / "src16.dcm"
    ds.save_as(src16, enforce_file_format=True)
    bits = int(ds.BitsStored)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (crop >> max(bits - 8, 0)).astype(np.uint8).tobytes()
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    src8 = work / "src8.dcm"
    ds.save_as(src8, enforce_file_format=True)
    return src16, src8, origin


def _encode(s: SyntaxInfo, src16: Path, src8: Path, work: Path) -> tuple[Path | None, str]:
    """The encoded file, or None and why not."""
    import pydicom

    out = work / f"{s.key}.dcm"
    if s.key in _DCMTK:
        cmd = _DCMTK[s.key]
        if shutil.which(cmd[0]) is None:
            return None, f"{cmd[0]} (dcmtk) not installed"
        src = src8 if s.key == "jpeg_baseline" else src16
        proc = subprocess.run([*cmd, str(src), str(out)], capture_output=True, text=True)
        return (out, "dcmtk " + cmd[0]) if proc.returncode == 0 else (None, proc.stderr.strip()[:200])
    if s.key.startswith("j2k"):
        ds = pydicom.dcmread(src16)
        kw: dict[str, Any] = {} if s.key == "j2k_lossless" else {"j2k_cr": [10]}
        ds.compress(s.uid, **kw)
        ds.save_as(out)
        return out, "OpenJPEG (pydicom)" + ("" if s.key == "j2k_lossless" else ", ratio 10")
    if s.key.startswith("htj2k"):
        if shutil.which("ojph_compress") is None:
            return None, "ojph_compress (openjph-tools) not installed"
        from pydicom.encaps import encapsulate

        ds = pydicom.dcmread(src16)
        pgm = work / "src.pgm"
        header = f"P5\n{ds.Columns} {ds.Rows}\n{2**ds.BitsStored - 1}\n".encode()
        pgm.write_bytes(header + ds.pixel_array.astype(">u2").tobytes())
        j2c = work / f"{s.key}.j2c"
        opts = ["-qstep", "0.01"] if s.lossy else ["-reversible", "true"]
        subprocess.run(
            ["ojph_compress", "-i", str(pgm), "-o", str(j2c), *opts], check=True, capture_output=True
        )
        ds.PixelData = encapsulate([j2c.read_bytes()])
        ds.file_meta.TransferSyntaxUID = s.uid
        ds.save_as(out)
        return out, "OpenJPH ojph_compress"
    return None, "no encoder"


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _time(s: SyntaxInfo, data: bytes, runs: int) -> dict[str, Any]:
    import pydicom
    from pydicom.pixels import pixel_array

    from ..sources.dicom_frames import dataset_frames

    plugins = decoder_plugins(s.uid)
    first = plugins[0] if plugins and plugins[0] != "pydicom" else ""
    ingest, decode = [], []
    for _ in range(runs + 1):  # one warm-up run (imports, plugin set-up)
        t0 = time.perf_counter()
        ds = pydicom.dcmread(io.BytesIO(data))
        frames = dataset_frames(ds)
        t1 = time.perf_counter()
        ds2 = pydicom.dcmread(io.BytesIO(data))
        t2 = time.perf_counter()
        pixel_array(ds2, decoding_plugin=first) if first else pixel_array(ds2)
        t3 = time.perf_counter()
        ingest.append((t1 - t0) * 1000)
        decode.append((t3 - t2) * 1000)
    ingest, decode = ingest[1:], decode[1:]
    assert len(frames) == 1
    return {
        "decoder": plugins[0] if plugins else "",
        "decode_ms_median": round(_percentile(decode, 50), 2),
        "ingest_ms_median": round(_percentile(ingest, 50), 2),
        "ingest_ms_p99": round(_percentile(ingest, 99), 2),
        "runs": runs,
    }


def run_decode_benchmark(args: Any) -> int:
    size, runs = int(args.size), int(args.runs)
    keys = [k.strip() for k in args.syntaxes.split(",")] if args.syntaxes else [s.key for s in SYNTAXES]
    unknown = sorted(set(keys) - {s.key for s in SYNTAXES})
    if unknown:
        raise SystemExit(f"bench-decode: unknown syntax {unknown}; known: {[s.key for s in SYNTAXES]}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src16, src8, origin = _source_frame(Path(args.image) if args.image else None, size, work)
        raw = len(__import__("pydicom").dcmread(src16).PixelData)
        for s in (x for x in SYNTAXES if x.key in keys):
            path, how = _encode(s, src16, src8, work)
            row: dict[str, Any] = {"syntax": s.key, "uid": s.uid, "name": s.name, "encoder": how}
            if path is None:
                row["skipped"] = how
            elif not decoder_plugins(s.uid):
                row["skipped"] = "no decoder installed"
            else:
                data = path.read_bytes()
                row["bytes"] = len(data)
                row["ratio"] = (
                    round(raw / len(data), 2) if s.key != "jpeg_baseline" else round(raw / 2 / len(data), 2)
                )
                row.update(_time(s, data, runs))
            rows.append(row)
            _print_row(row)
    result = {
        "frame": origin,
        "size": size,
        "runs": runs,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": _cpus()},
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _print_row(row: dict[str, Any]) -> None:
    if "skipped" in row:
        print(f"{row['syntax']:22s} skipped: {row['skipped']}", flush=True)
        return
    print(
        f"{row['syntax']:22s} {row['decoder']:10s} ratio {row['ratio']:6.2f}"
        f"  decode {row['decode_ms_median']:7.1f} ms  ingest median {row['ingest_ms_median']:7.1f} ms"
        f"  p99 {row['ingest_ms_p99']:7.1f} ms",
        flush=True,
    )
