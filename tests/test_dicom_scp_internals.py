"""The pynetdicom internals the DICOM SCP relies on, checked against the installed release.

The SCP (fluorosam_rt/sources/dicom_scp.py) gives each accepted socket a timeout through
``event.assoc.dul.socket.socket``, which is not pynetdicom's public API. If a release moves that
attribute, the handler raises, pynetdicom only logs it at ERROR, and stalled peers hold their
association slots for ever again (tests/test_faults.py shows the symptom only after a long
wait). These tests fail at once, and name the attribute.
"""

from __future__ import annotations

import socket
import sys
import threading
from importlib.metadata import requires, version
from pathlib import Path

from packaging.requirements import Requirement

from fluorosam_rt.sources.dicom_scp import DicomStorageSource

sys.path.insert(0, str(Path(__file__).parent))
from test_sources import XA, Collector, _pynetdicom_store, multiframe_xa


def test_installed_pynetdicom_is_in_the_tested_range():
    # The installed project's own requirements (scripts/setup.sh reinstalls when pyproject changes).
    reqs = [Requirement(r) for r in requires("fluorosam-rt") or []]
    req = next(r for r in reqs if r.name == "pynetdicom" and r.marker is None)
    assert req.specifier, "pynetdicom must be pinned to the range the SCP was tested with"
    assert req.specifier.contains(version("pynetdicom")), (
        f"pynetdicom {version('pynetdicom')} is outside the tested range {req.specifier}: "
        "rerun tests/test_dicom_scp_internals.py, tests/test_faults.py and tests/test_dicom_tls.py, "
        "then widen the pin"
    )


def test_connection_handler_reaches_the_accepted_socket_and_sets_its_timeout(tmp_path):
    """A real association: the handler must find a socket at ``assoc.dul.socket.socket`` and
    leave the source's ``network_timeout_s`` on it (7.25 s: not a default of anything)."""
    src, sink = (
        DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", network_timeout_s=7.25),
        Collector(),
    )
    seen: list[tuple[str, object]] = []
    lock = threading.Lock()
    original = src._on_connection_open

    def probe(event):
        try:
            original(event)  # what the SCP does, errors included
            dul = event.assoc.dul
            if not hasattr(dul, "socket") or not hasattr(dul.socket, "socket"):
                raise AttributeError("pynetdicom moved assoc.dul.socket.socket")
            sock = dul.socket.socket
            result: tuple[str, object] = (
                ("timeout", sock.gettimeout())
                if isinstance(sock, socket.socket)
                else ("not a socket", type(sock).__name__)
            )
        except Exception as exc:  # reported by the assertion below, not swallowed by pynetdicom
            result = ("error", f"{type(exc).__name__}: {exc}")
        with lock:
            seen.append(result)

    src._on_connection_open = probe  # start() binds the handler from the instance
    src.start(sink)
    try:
        status, _ = _pynetdicom_store(src.address[1], multiframe_xa(tmp_path / "a.dcm", n_frames=1), [XA])
        assert status is not None
        assert status.Status == 0x0000
        assert len(sink.wait(1)) == 1
    finally:
        src.stop()
    assert seen == [("timeout", 7.25)], (
        f"the SCP's connection handler saw {seen}: pynetdicom {version('pynetdicom')} no longer keeps "
        "the accepted socket at event.assoc.dul.socket.socket (fluorosam_rt/sources/dicom_scp.py)"
    )
