"""A DICOM frame's source time is its C-STORE arrival (plus its place in a cine), not the pacer's
emit time: decode and queueing inside the SCP then show in the node's stage timings."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace as NS

from fluorosam_rt.sources.dicom_scp import DicomStorageSource

sys.path.insert(0, str(Path(__file__).parent))
from test_sources import XA, multiframe_xa


def test_frames_carry_arrival_time_and_cine_offsets(tmp_path) -> None:
    ds = multiframe_xa(tmp_path / "cine.dcm", n_frames=4)  # FrameTime 50 ms
    src = DicomStorageSource(port=0)
    got = []
    src._sink = got.append  # emit() hands frames here; no server needed for the store handler
    event = NS(request=NS(AffectedSOPClassUID=XA), assoc=NS(requestor=NS(ae_title="CARM")))
    before = time.time_ns()
    status = src._store(event, ds)
    after = time.time_ns()
    assert int(status.Status if hasattr(status, "Status") else status) == 0
    time.sleep(0.2)  # the pacer plays the cine well after arrival: source times must not move
    pacer = threading.Thread(target=src._pace, daemon=True)
    pacer.start()
    deadline = time.monotonic() + 30
    while len(got) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    src._stop.set()
    pacer.join(5)
    stamps = [f.source_ts_ns for f in got]
    assert len(stamps) == 4
    assert before <= stamps[0] <= after  # arrival, not emit time (>= 200 ms later)
    assert [b - a for a, b in itertools.pairwise(stamps)] == [50_000_000] * 3
