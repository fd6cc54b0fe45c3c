"""fluorosam-train curves: a multi-session run's log read as one history, stages found in the ledger."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from train.cli import main as train_main
from train.curves import read_log, smooth, stages

LOG_HEADER = ["step", "epoch", "lr", "loss", "mask", "absent", "iou", "vq", "text_iou", "elapsed_s"]
LEDGER_HEADER = ["start_utc", "end_utc", "start_step", "end_step", "wall_s", "cpu_s", "ended_by", "config"]


def _write_run(tmp_path, log_rows, ledger_rows):
    with open(tmp_path / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOG_HEADER)
        for step, loss in log_rows:
            w.writerow([step, 0, 1e-4 * (1 + step / 100), loss, loss * 0.9, 0.01, 0, 0, 0, step])
    with open(tmp_path / "ledger.csv", "w", newline="") as f:
        w = csv.DictWriter(f, LEDGER_HEADER)
        w.writeheader()
        for start, end, config in ledger_rows:
            w.writerow({"start_step": start, "end_step": end, "config": config, "ended_by": "SIGTERM"})
    return tmp_path


def test_steps_logged_twice_across_a_resume_keep_the_later_rows(tmp_path):
    # Segment 1 logged 10..40, was killed after its checkpoint at 20; segment 2 resumed at 20.
    run = _write_run(
        tmp_path,
        [(10, 5.0), (20, 4.0), (30, 9.0), (40, 9.5), (30, 3.0), (40, 2.5), (50, 2.0)],
        [(0, 20, ""), (20, 50, "a.yaml")],
    )
    c = read_log(run)
    assert c.step.tolist() == [10, 20, 30, 40, 50]
    assert c.values["loss"].tolist() == [5.0, 4.0, 3.0, 2.5, 2.0]


def test_stages_are_where_the_config_chain_changes(tmp_path):
    ledger = [
        {"start_step": "0", "config": ""},
        {"start_step": "100", "config": "s1.yaml + s2.yaml"},
        {"start_step": "150", "config": "s1.yaml + s2.yaml"},
        {"start_step": "300", "config": "s1.yaml + s2.yaml + s3.yaml"},
    ]
    got = [(s.start_step, s.config) for s in stages(ledger)]
    assert got == [(100, "s2.yaml"), (300, "s3.yaml")]


def test_smoothing_is_a_trailing_mean():
    v = np.array([1.0, 3.0, 5.0, 7.0])
    assert smooth(v, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert smooth(v, 1).tolist() == v.tolist()


def test_cli_writes_a_png(tmp_path):
    run = _write_run(tmp_path, [(s, 3.0 - s / 100) for s in range(10, 210, 10)], [(0, 200, "a.yaml")])
    out = tmp_path / "curves.png"
    assert train_main(["curves", "--run", str(run), "--out", str(out), "--window", "5"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_a_log_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"log\.csv not found"):
        train_main(["curves", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")])
    (tmp_path / "log.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="no column"):
        train_main(["curves", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")])
