"""Training curves of a run folder: loss and learning rate against the step, stages and segments marked.

A run that spans sessions is only readable as a whole: ``log.csv`` holds every logged step, and the
ledger says where each segment began and which config chain it trained with. The plot draws the loss
(raw and smoothed), the mask and absent-prompt parts and the learning rate, marks every segment start,
and names each stage where the ledger's config changes, so a step in the loss can be traced to the
stage or resume that caused it.

A resumed segment restarts from the last checkpoint, so steps logged after that checkpoint and before
the kill appear twice in ``log.csv``; the later rows (the history the model actually has) win.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("loss", "mask", "absent", "lr")


@dataclass(frozen=True)
class Curves:
    """One value per logged step, steps ascending and unique."""

    step: np.ndarray
    values: dict[str, np.ndarray]


@dataclass(frozen=True)
class Stage:
    """A ledger segment whose config chain differs from the previous segment's."""

    start_step: int
    config: str


def read_log(run: str | Path) -> Curves:
    """``log.csv`` of a run folder, deduplicated by step (the last row of a step wins)."""
    path = Path(run) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run folder that fit has logged into")
    rows: dict[int, dict[str, str]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("step", *COLUMNS) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column(s) {', '.join(missing)}; is it a fit log?")
        for r in reader:
            rows[int(r["step"])] = r
    if not rows:
        raise ValueError(f"{path} has no logged steps yet")
    steps = np.array(sorted(rows))
    return Curves(steps, {c: np.array([float(rows[s][c]) for s in steps]) for c in COLUMNS})


def stages(ledger: list[dict[str, str]]) -> list[Stage]:
    """Where the config chain changes along the ledger (rows without a config name none)."""
    out: list[Stage] = []
    previous = None
    for r in sorted(ledger, key=lambda r: int(r["start_step"])):
        cfg = (r.get("config") or "").strip()
        if cfg and cfg != previous:
            out.append(Stage(int(r["start_step"]), cfg.split(" + ")[-1]))
            previous = cfg
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` logged steps (the first points average what exists)."""
    if window <= 1 or values.size == 0:
        return values.astype(float)
    c = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    n = np.minimum(np.arange(1, values.size + 1), window)
    return (c[1:] - c[np.arange(1, values.size + 1) - n]) / n


def plot_run(run: str | Path, out: str | Path, window: int = 100) -> Path:
    """Write the run's curves to ``out`` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.fit import read_ledger

    curves = read_log(run)
    ledger = read_ledger(run)
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, height_ratios=(3, 1))
    s = curves.step
    ax.plot(s, curves.values["loss"], color="0.8", lw=0.5, label="loss (logged)")
    for name, color in (("loss", "k"), ("mask", "tab:blue"), ("absent", "tab:red")):
        label = f"{name}, mean of {window}"
        ax.plot(s, smooth(curves.values[name], window), color=color, lw=1.2, label=label)
    top = float(np.percentile(curves.values["loss"], 99))  # read_log refuses an empty log
    ax.set_ylim(0, top * 1.05)
    ax.set_ylabel("loss")
    ax_lr.plot(s, curves.values["lr"], color="tab:green")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    for r in ledger:
        for a in (ax, ax_lr):
            a.axvline(int(r["start_step"]), color="0.6", lw=0.5, ls=":")
    for st in stages(ledger):
        for a in (ax, ax_lr):
            a.axvline(st.start_step, color="tab:purple", lw=1.0)
        ax.text(
            st.start_step,
            0.02,
            f" {Path(st.config).stem}",
            color="tab:purple",
            fontsize=7,
            rotation=90,
            va="bottom",
            transform=ax.get_xaxis_transform(),
        )
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(f"{Path(run).name}: {s[-1]:,} steps; dotted: segment starts (ledger), purple: stage starts")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
