"""One training segment on a lent GPU machine, and folding its result back into the CPU run.

``scripts/gpu_train.sh`` calls the pieces; they live here so they are tested and so the CPU machine
runs the very same code (``--device cpu``):

* ``split``/``merge``: a checkpoint leaves the machine in parts of at most 15 MiB (the tool brings back
  files of at most 16 MiB) with the whole file's SHA-256; merging checks it, so the result is
  byte-identical.
* ``config``: the v2 run's current stage (stage 2, ``base:`` resolved) with the GPU overrides
  (``configs/train/v2_gpu.yaml``) and any ``key=value`` on top, written as one YAML (``fit`` reads
  one file, unknown keys are errors).
* ``fit``: ``fluorosam-train fit`` with the text encoder replaced by the run's text-feature bank. Why:
  training only ever indexes that bank (``train.fit`` builds it once), and the MiniLM weights (88 MB)
  cannot travel; a text the bank lacks is an error, never a guess.
* ``report``: device, steps, per-step timing and the synth rate into one JSON.
* ``fold``: merge the parts into the run folder's ``last.pt`` (refused while that run is training or
  when it moved on since the pack), add the ledger row, the log rows and the model.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PART_BYTES = 15 * 1024 * 1024


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_file(path: str | Path, out_dir: str | Path, part_bytes: int = PART_BYTES) -> Path:
    """``path`` -> ``<name>.partNN`` files of at most ``part_bytes`` and ``<name>.parts.json``."""
    path, out_dir = Path(path), Path(out_dir)
    if part_bytes <= 0:
        raise ValueError("part_bytes must be positive")
    out_dir.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes()
    parts = []
    for i in range(max(1, -(-len(data) // part_bytes))):
        name = f"{path.name}.part{i:02d}"
        (out_dir / name).write_bytes(data[i * part_bytes : (i + 1) * part_bytes])
        parts.append(name)
    manifest = out_dir / f"{path.name}.parts.json"
    sha = hashlib.sha256(data).hexdigest()
    manifest.write_text(json.dumps({"file": path.name, "bytes": len(data), "sha256": sha, "parts": parts}))
    return manifest


def merge_parts(manifest: str | Path, dest: str | Path) -> str:
    """Concatenate the parts a manifest names into ``dest`` (atomically); returns the verified SHA-256."""
    manifest, dest = Path(manifest), Path(dest)
    m = json.loads(manifest.read_text())
    data = b"".join((manifest.parent / p).read_bytes() for p in m["parts"])
    sha = hashlib.sha256(data).hexdigest()
    if len(data) != m["bytes"] or sha != m["sha256"]:
        raise ValueError(f"{manifest}: merged parts do not match (size {len(data)} vs {m['bytes']}, sha256)")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return sha


def merged_config(base: str | Path, overrides: list[str | Path], sets: list[str]) -> dict[str, Any]:
    """``base`` (its ``base:`` chain resolved) updated by each override YAML (sections key by key),
    then ``key=value`` (YAML-parsed values, ``a.b=v`` for a section key); checked against
    ``FitConfig``. The merge is train.fit's, the one ``fit --config`` applies to a ``base:`` chain."""
    import yaml

    from train.fit import FitConfig, load_config_dict, merge_config

    cfg, _ = load_config_dict(base)
    layers = [yaml.safe_load(Path(o).read_text()) or {} for o in overrides]
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set takes key=value, got {s!r}")
        k, v = s.split("=", 1)
        layer: dict[str, Any] = {}
        node = layer
        *heads, last = k.split(".")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = yaml.safe_load(v)
        layers.append(layer)
    for layer in layers:
        cfg = merge_config(cfg, layer)
    FitConfig.from_dict(dict(cfg))  # unknown keys are errors here, not on the device
    return cfg


class BankTextEncoder:
    """Serves the text-feature bank a run already computed; ``train.fit`` only needs its identity."""

    def __init__(self, bank_file: str | Path, kind: str) -> None:
        import torch

        saved = torch.load(bank_file, map_location="cpu", weights_only=True)
        self.kind = kind
        self._identity = saved["identity"]
        self.feature_dim = int(saved["features"].shape[1])
        self.bank_file = str(bank_file)

    def identity(self) -> str:
        return self._identity

    def encode(self, texts: list[str]):
        raise KeyError(
            f"{len(texts)} prompt texts are not in the text-feature bank {self.bank_file} "
            f"(e.g. {sorted(texts)[:3]}); rebuild it with the text encoder on a machine that has it"
        )


def fit_with_bank(bank_file: str, fit_argv: list[str]) -> int:
    """Run ``fluorosam-train fit`` with ``BankTextEncoder`` in place of the text encoder."""
    import train.fit as fit_mod
    from train.cli import main as cli_main

    fit_mod.text_encoder_for = lambda model: BankTextEncoder(bank_file, model.cfg.text.kind)
    return int(cli_main(["fit", *fit_argv]) or 0)


def step_timing(log_csv: str | Path) -> dict[str, Any]:
    """Seconds per step between consecutive log rows (first window reported apart: warm-up)."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    pts = [(int(r["step"]), float(r["elapsed_s"])) for r in rows]
    per = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in itertools.pairwise(pts) if s1 > s0]
    if not per:
        return {"windows": 0}
    return {
        "windows": len(per),
        "first_window_s_per_step": round(per[0], 4),
        "median_s_per_step": round(statistics.median(per), 4),
        "mean_s_per_step": round(statistics.fmean(per), 4),
        "max_s_per_step": round(max(per), 4),
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from train.fit import _cpu_name

    return f"cpu ({_cpu_name()})"


def write_report(work: Path, out: Path, device: str, phases: dict[str, float], base_step: int) -> dict:
    """gpu_run.json: device, steps, wall, per-step timing, synth rates and the segment's ledger row."""
    from train.fit import read_ledger

    run = work / "run"
    synth = []
    for d in sorted((work / "data").glob("chunk_*")):
        ds = json.loads((d / "dataset.json").read_text())
        synth.append(
            {
                k: ds.get(k)
                for k in ("n_images", "seconds_total", "seconds_render", "images_per_second", "workers")
            }
            | {"chunk": d.name, "device": ds["config"].get("device")}
        )
    ledger = read_ledger(run)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    n_img = sum(s["n_images"] or 0 for s in synth)
    render_s = sum(s["seconds_render"] or 0 for s in synth)
    rep = {
        "device": device_name(device),
        "device_arg": device,
        "base_step": base_step,
        "end_step": summary.get("steps"),
        "phases_s": phases,
        "synth": {
            "chunks": synth,
            "images": n_img,
            "images_per_second_render": round(n_img / render_s, 3) if render_s else None,
        },
        "fit_timing": step_timing(run / "log.csv") if (run / "log.csv").exists() else {},
        "ledger_row": ledger[-1] if ledger else None,
        "summary": summary,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "gpu_run.json").write_text(json.dumps(rep, indent=1))
    return rep


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def fold(results: Path, run: Path, pack_manifest: Path | None, force: bool = False) -> dict[str, Any]:
    """Install a device segment into ``run``: last.pt from its parts, model, ledger row and log rows."""
    import torch

    from train.fit import LEDGER_FIELDS, record_segment

    if _pid_alive(run / "train.pid"):
        raise RuntimeError(f"{run} is training (train.pid alive): stop it first (scripts/train_v2.sh stop)")
    rep = json.loads((results / "gpu_run.json").read_text())
    if pack_manifest is not None and (run / "last.pt").exists() and not force:
        packed = json.loads(pack_manifest.read_text())["checkpoint_sha256"]
        if sha256_file(run / "last.pt") != packed:
            raise RuntimeError(
                f"{run}/last.pt changed since the pack (the CPU run went on); --force discards those steps"
            )
    merged = results / "last.pt"
    sha = merge_parts(results / "last.pt.parts.json", merged)
    state = torch.load(merged, map_location="cpu", weights_only=False)
    if rep.get("end_step") is not None and int(state["step"]) != int(rep["end_step"]):
        raise RuntimeError(f"checkpoint step {state['step']} differs from the report's {rep['end_step']}")
    merged.replace(run / "last.pt")
    if (results / "model.safetensors").exists():
        tmp = run / ".model.safetensors.tmp"
        tmp.write_bytes((results / "model.safetensors").read_bytes())
        tmp.replace(run / "model.safetensors")
    if rep.get("ledger_row"):
        record_segment(run, {k: rep["ledger_row"].get(k, "") for k in LEDGER_FIELDS})
    added = 0
    if (results / "log.csv").exists() and (run / "log.csv").exists():
        with open(results / "log.csv", newline="") as f, open(run / "log.csv", "a", newline="") as g:
            w = csv.writer(g)
            for row in csv.reader(f):
                if row and row[0].isdigit() and int(row[0]) > int(rep["base_step"]):
                    w.writerow(row)
                    added += 1
    return {"step": int(state["step"]), "sha256": sha, "log_rows": added, "run": str(run)}


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:  # everything after "--" goes to fluorosam-train fit unchanged
        ap = argparse.ArgumentParser(prog="python -m train.device_run fit")
        ap.add_argument("--bank", required=True, help="text_features.pt of the run")
        rest = argv[1:]
        cut = rest.index("--") if "--" in rest else len(rest)
        a = ap.parse_args(rest[:cut])
        return fit_with_bank(a.bank, rest[cut + 1 :])
    ap = argparse.ArgumentParser(prog="python -m train.device_run")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("split")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--part-bytes", type=int, default=PART_BYTES)
    p = sub.add_parser("merge")
    p.add_argument("manifest")
    p.add_argument("dest")
    p = sub.add_parser("config")
    p.add_argument("--base", required=True)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--phases", default="{}", help="JSON {phase: seconds}")
    p.add_argument("--base-step", type=int, required=True)
    p = sub.add_parser("fold", help="install a device segment's results into a run folder")
    p.add_argument("results", help="the folder the device's $OUT files came back to")
    p.add_argument("--run", default="runs/v2")
    p.add_argument("--pack-manifest", default=".gpu_carry/pack.json")
    p.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "split":
            print(split_file(a.file, a.out_dir, a.part_bytes))
        elif a.cmd == "merge":
            print(merge_parts(a.manifest, a.dest))
        elif a.cmd == "config":
            import yaml

            cfg = merged_config(a.base, a.override, a.set)
            Path(a.out).write_text(yaml.safe_dump(cfg, sort_keys=False))
        elif a.cmd == "report":
            rep = write_report(Path(a.work), Path(a.out), a.device, json.loads(a.phases), a.base_step)
            print(json.dumps({k: rep[k] for k in ("device", "base_step", "end_step", "fit_timing")}))
        else:
            pm = Path(a.pack_manifest) if a.pack_manifest and Path(a.pack_manifest).exists() else None
            print(json.dumps(fold(Path(a.results), Path(a.run), pm, a.force)))
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        print(f"[device_run] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
