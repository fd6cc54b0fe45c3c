"""CPU time and memory of another process, read from /proc (Linux), for per-cell accounting.

Sampled by the benchmark at the edges of each measurement window so model loading and warm-up
are not charged to the cell; no psutil needed.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (all its threads)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_mb(pid: int) -> dict[str, float]:
    """Resident set now (``rss_mb``) and its high-water mark (``peak_rss_mb``), in MiB."""
    out = {"rss_mb": float("nan"), "peak_rss_mb": float("nan")}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            out["peak_rss_mb"] = int(line.split()[1]) / 1024
    return out


def reset_peak_rss(pid: int) -> bool:
    """Restart the VmHWM high-water mark so a cell's peak is its own; False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def open_fds(pid: int) -> int:
    """File descriptors the process holds now (sockets, pipes, files)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    """Threads of the process now (Python's, libzmq's I/O threads, the engines' pools)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the benchmark's helper processes poll it to end cleanly
    and write their counters (a handler that raised would cut them off mid-write)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frm: stop.set())
    return stop
