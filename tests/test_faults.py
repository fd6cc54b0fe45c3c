"""Faults the node must survive (issue 9), each on the real node with real sockets and sources.

The shared machine these run on is loaded, so nothing here asserts tight timings. Faults are
judged by counts (frames published, seq gaps, FDs, threads) and by "the node kept working";
latencies are measured and reported with loose bounds that only a stalled pipeline would break.
Every integration test ends with the accounting invariant (``running_node`` checks it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from bridge import Subscriber, SubscriberTimeout
from engines.chain import Loaded
from fluorosam_rt.service.node_config import load_settings
from fluorosam_rt.service.serve import build_app
from fluorosam_rt.sources import SourceError
from fluorosam_rt.sources.dicom_scp import DicomStorageSource
from fluorosam_rt.sources.replay import ReplaySource
from fluorosam_rt.sources.video import VideoSource

sys.path.insert(0, str(Path(__file__).parent))
from test_node import (
    assert_accounting,
    running_node,
    wait_for,
)
from test_sources import XA, Collector, _pynetdicom_store, multiframe_xa, storescu, write_video

REPO = Path(__file__).resolve().parents[1]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _frames_dir(tmp_path: Path, n: int = 4, size: int = 96) -> Path:
    d = tmp_path / "frames"
    d.mkdir(exist_ok=True)
    for i in range(n):
        img = np.random.default_rng(i).integers(0, 255, (size, size), np.uint8)
        cv2.circle(img, (size // 2, size // 2), size // 4 + i, 220, -1)
        cv2.imwrite(str(d / f"{i}.png"), img)
    return d


# --------------------------------------------------------------------------- subscribers


def _follow(sub: Subscriber, stop: threading.Event, got: list, period: float = 0.0) -> None:
    while not stop.is_set():
        try:
            got.append(sub.receive(timeout=0.3, newest=period > 0))
        except SubscriberTimeout:
            continue
        if period:
            stop.wait(period)


_DYING_SUBSCRIBER = """
import sys
from bridge import Subscriber
sub = Subscriber(sys.argv[1], topic="carm0")
sub.receive(timeout=30)
print("got one", flush=True)
sys.stdin.read()  # blocks until the test kills us with SIGKILL
"""


def test_dead_slow_and_reconnecting_subscribers_do_not_hurt_the_others(tmp_path, bundle):
    source = {"kind": "replay", "path": str(_frames_dir(tmp_path)), "fps": 8, "loop": True}
    endpoint = f"ipc://{tmp_path}/masks"
    with running_node(tmp_path, bundle, source, prompts=("lungs", "heart")) as (app, fast):
        stop, fast_got = threading.Event(), []
        reader = threading.Thread(target=_follow, args=(fast, stop, fast_got), daemon=True)
        reader.start()
        extra: list[threading.Thread] = []
        try:
            # -- baseline: one subscriber that keeps up
            wait_for(lambda: len(fast_got) >= 3, 30, "first frames")
            time.sleep(0.5)
            fds0, threads0 = open_fds(), threading.active_count()
            n0 = app.node.flow.count
            time.sleep(3.0)
            base = app.node.flow.summary(last=app.node.flow.count - n0)
            lost0 = fast.lost

            # -- faults: a subscriber killed with SIGKILL, one reading 1 frame/s, one reconnecting
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            dying = subprocess.Popen(
                [sys.executable, "-c", _DYING_SUBSCRIBER, endpoint],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )
            try:
                assert dying.stdout.readline().strip() == "got one"
            finally:
                dying.kill()
                dying.wait(timeout=10)
                dying.stdin.close()
                dying.stdout.close()
            slow = Subscriber(endpoint, topic="carm0", rcvhwm=1)
            slow_got: list = []
            extra.append(threading.Thread(target=_follow, args=(slow, stop, slow_got, 1.0), daemon=True))
            extra[-1].start()
            n1 = app.node.flow.count
            reconnects = 0
            t_end = time.monotonic() + 4.0
            while time.monotonic() < t_end:
                with Subscriber(endpoint, topic="carm0") as again:
                    try:
                        again.receive(timeout=2)
                        reconnects += 1
                    except SubscriberTimeout:
                        pass
            faulted = app.node.flow.summary(last=app.node.flow.count - n1)
            stop.set()
            for t in (reader, *extra):
                t.join(timeout=5)
            slow.close()
            lost_faults = fast.lost - lost0
            time.sleep(0.5)  # libzmq closes the dead peers' pipes on its I/O thread
            fds1, threads1 = open_fds(), threading.active_count()
        finally:
            stop.set()
    print(
        "subscriber faults: end_to_end p50 baseline "
        f"{base['end_to_end']['p50_ms']:.1f} ms, with faults {faulted['end_to_end']['p50_ms']:.1f} ms; "
        f"publish_wait p99 {faulted['publish_wait']['p99_ms']:.2f} ms; reconnects {reconnects}; "
        f"fds {fds0}->{fds1}; threads {threads0}->{threads1}"
    )
    assert reconnects >= 2
    assert 2 <= len(slow_got) <= 8  # it read about one a second, and always got one
    # The fast subscriber missed nothing because of the others (a loaded machine may cost it one).
    assert lost_faults <= 1, lost_faults
    # Publishing never waited on any subscriber: one that blocked on the slow reader (a read a
    # second) would wait about a second per message; a hiccup on a loaded machine is far shorter.
    assert faulted["publish_wait"]["p99_ms"] < 0.5 * 1000
    # ... and the pipeline did not stall (a ratio to the baseline just before, same machine).
    assert faulted["end_to_end"]["p50_ms"] < 2 * base["end_to_end"]["p50_ms"] + 100
    # Nothing leaked: the dead and reconnected peers' FDs are gone, no thread was left behind.
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert threads1 <= threads0, (threads0, threads1)


# --------------------------------------------------------------------------- sources


def test_video_device_disappears_and_returns(tmp_path, bundle):
    """A grabber that vanishes: status says 'reconnecting' with a growing count, then frames resume."""
    clip = tmp_path / "grabber.avi"
    write_video(clip, n=6, fps=30)
    source = {"kind": "replay", "path": str(_frames_dir(tmp_path)), "fps": 5}
    with running_node(tmp_path, bundle, source) as (app, sub):
        # Swap in a live-device video source before frames matter (the replay is only a carrier).
        app.node.source.stop()
        video = VideoSource(
            str(clip), realtime=True, reconnect_initial_s=0.05, reconnect_max_s=0.2, end_of_file="reconnect"
        )
        app.node.source = video
        hidden = tmp_path / "unplugged.avi"
        video.start(app.node.receive)
        wait_for(lambda: video.emitted >= 3, 20, "frames from the device")
        clip.rename(hidden)  # unplugged: the capture ends and cannot be reopened
        wait_for(lambda: video.reconnects >= 3, 20, "reconnect attempts")
        status = app.control.handle(b'{"cmd": "status"}')["status"]["source"]
        assert status["state"] == "reconnecting"
        assert status["reconnects"] >= 3
        assert "cannot open" in status["last_error"]
        before = video.emitted
        hidden.rename(clip)  # plugged back in
        wait_for(lambda: video.emitted > before + 2, 20, "frames after the device returned")
        wait_for(lambda: video.state == "running" or video.emitted > before + 6, 10, "running again")
        sub.receive(timeout=20)
    assert app.final["received"] >= before + 3


def _raw_pdata_then_drop(port: int, calling: str = "SCU") -> None:
    """Associate with pynetdicom, then write half a P-DATA-TF PDU and cut the connection."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(XA, pydicom.uid.ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="FSAMTEST")
    assert assoc.is_established
    sock: socket.socket = assoc.dul.socket.socket
    # PDU type 0x04, length 100000; then a PDV item header and 2 kB of the announced data.
    sock.sendall(struct.pack(">BBI", 0x04, 0, 100_000) + struct.pack(">IBB", 99_996, 1, 0x00) + b"\0" * 2048)
    time.sleep(0.2)
    # Cut the connection under pynetdicom; its own reader sees EOF and ends the association.
    # (kill()/abort() here can wait forever on a socket that is already gone.)
    sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not assoc.is_alive(), 15, "the cut association to end on the sender's side")


def test_dicom_association_aborted_mid_transfer_and_truncated_multiframe(tmp_path):
    src, sink = DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST"), Collector()
    src.start(sink)
    try:
        threads0 = threading.active_count()
        port = src.address[1]
        _raw_pdata_then_drop(port)
        # A multi-frame object whose pixel data stops after 1.5 of its 4 frames.
        ds = multiframe_xa(tmp_path / "cine.dcm", n_frames=4)
        ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * 1.5 / 4)]
        status, _ = _pynetdicom_store(port, ds, [XA])
        assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
        assert "ErrorComment" in status
        # ... and one with an odd number of bytes dropped from the end (not even a whole pixel).
        ds = multiframe_xa(tmp_path / "cine2.dcm", n_frames=2)
        ds.PixelData = ds.PixelData[:-3]
        status, _ = _pynetdicom_store(port, ds, [XA])
        assert 0xC000 <= status.Status <= 0xCFFF, hex(status.Status)
        # The SCP kept running: a good object still arrives in full.
        good = multiframe_xa(tmp_path / "ok.dcm", n_frames=2)
        status, _ = _pynetdicom_store(port, good, [XA])
        assert status.Status == 0x0000
        assert len(sink.wait(2)) == 2
        # The aborted association's thread is gone.
        wait_for(lambda: threading.active_count() <= threads0, 10, "association threads to end")
    finally:
        src.stop()
    assert src.rejected["cannot_understand"] == 2
    assert src.emitted == 2


def _stall(port: int, how: str) -> tuple[socket.socket, object]:
    """A peer that starts a PDU and goes quiet with the connection open: (its socket, and for a
    pynetdicom requestor its association, whose reader thread owns the socket)."""
    if how == "half_header":  # 3 of the 6 header bytes of an A-ASSOCIATE-RQ
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(b"\x01\x00\x00")
        return sock, None
    from pynetdicom import AE

    ae = AE(ae_title="STALLER")
    ae.add_requested_context(XA, pydicom.uid.ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120  # the staller never gives up first
    assoc = ae.associate("127.0.0.1", port, ae_title="FSAMTEST")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    # A-ASSOCIATE-RQ accepted; now a P-DATA-TF announcing 100000 bytes, of which 2 kB come.
    sock.sendall(struct.pack(">BBI", 0x04, 0, 100_000) + struct.pack(">IBB", 99_996, 1, 0x00) + b"\0" * 2048)
    return sock, assoc


def _closed_by_server(sock: socket.socket, assoc: object, within: float) -> bool:
    """True once the server has closed the stalled connection (EOF or reset; an A-ABORT PDU may
    come first). A pynetdicom requestor's own reader sees that and ends its association."""
    if assoc is not None:
        deadline = time.monotonic() + within
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not assoc.is_alive()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except OSError:  # the timeout: still open
        return False
    return True


@pytest.mark.parametrize("how", ["half_header", "half_pdata"])
def test_stalled_dicom_peer_is_dropped_and_frees_its_slot(tmp_path, how):
    """Plain TCP, max_associations 1: a peer that sends part of a PDU and then nothing, keeping
    its connection open, is dropped after ``network_timeout_s`` and the next sender (dcmtk's
    storescu) is served. Without a socket timeout pynetdicom's reader waits for the rest of the
    PDU for ever, its ACSE and idle timeouts cannot end the association, and the slot stays taken.
    """
    timeout_s = 3.0
    src, sink = (
        DicomStorageSource(
            host="127.0.0.1", port=0, ae_title="FSAMTEST", max_associations=1, network_timeout_s=timeout_s
        ),
        Collector(),
    )
    src.start(sink)
    stalled, keep = None, None
    try:
        threads0 = threading.active_count()
        port = src.address[1]
        cine = tmp_path / "cine.dcm"
        multiframe_xa(cine, n_frames=2)
        t0 = time.monotonic()
        stalled, keep = _stall(port, how)
        time.sleep(0.3)
        # The stalled peer holds the only slot: a sender right now is refused.
        status, refused = _pynetdicom_store(port, pydicom.dcmread(cine), [XA])
        early = status is None  # refused; a loaded machine may already be past the timeout
        if time.monotonic() - t0 < timeout_s - 0.5:
            assert status is None
            assert not refused.is_established
        # After the timeout the server has closed the stalled connection ...
        assert _closed_by_server(stalled, keep, 30), "the server did not close the stalled connection"
        dropped_after = time.monotonic() - t0
        # ... and a real sender is served.
        wait_for(lambda: storescu(port, cine).returncode == 0, 20, "storescu to be served after the stall")
        served_after = time.monotonic() - t0
        assert len(sink.wait(2 if early else 4)) == (2 if early else 4)
        print(f"{how}: stalled peer cut after {dropped_after:.1f} s, storescu served at {served_after:.1f} s")
        assert dropped_after >= timeout_s - 0.5
        assert served_after < timeout_s + 20
        wait_for(lambda: threading.active_count() <= threads0, 10, "the stalled association's threads to end")
    finally:
        if stalled is not None:
            with contextlib.suppress(OSError):
                stalled.shutdown(socket.SHUT_RDWR)
            stalled.close()
        src.stop()
    assert src.objects_received == (1 if early else 2)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("truncated.dcm", "dicom_truncated"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
        ("empty.avi", b""),
        ("half.avi", "video_truncated"),
        ("noise.dcm", bytes(range(256)) * 4),
    ],
    ids=lambda v: v if isinstance(v, str) and "." in v else "",
)
def test_corrupt_replay_file_is_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    if content == "dicom_truncated":
        multiframe_xa(tmp_path / "full.dcm", n_frames=3)
        data = (tmp_path / "full.dcm").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif content == "video_truncated":
        write_video(tmp_path / "full.avi", n=10)
        data = (tmp_path / "full.avi").read_bytes()
        path.write_bytes(data[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(SourceError) as info:
        ReplaySource(path)
    assert name in str(info.value) or "cannot" in str(info.value)


def test_corrupt_replay_file_through_the_cli_exits_2_with_a_message(tmp_path, checkpoint):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" * 10)
    argv = ["serve", "--source", f"replay:{bad}", "--publish", f"ipc://{tmp_path}/p", "--control", "none"]
    proc = subprocess.run(
        [sys.executable, "-m", "fluorosam_rt.cli", *argv, "--checkpoint", str(checkpoint)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- engines


class BrokenEngine:
    """A real engine that has gone bad: raises, or returns NaN/Inf, on every image."""

    def __init__(self, inner, mode: str) -> None:
        self.inner, self.mode, self.name, self.calls = inner, mode, f"broken-{mode}", 0

    def __getattr__(self, item):
        return getattr(self.inner, item)

    def encode_image(self, x):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        out = self.inner.encode_image(x)
        return out * float("inf") if self.mode == "inf" else out * float("nan")

    def describe(self) -> dict:
        return {**self.inner.describe(), "engine": self.name}


@pytest.mark.parametrize("mode", ["raise", "nan", "inf"])
def test_repeated_engine_failures_fall_back_to_the_next_engine(tmp_path, bundle, mode):
    settings = load_settings(
        None,
        {
            "source": {"kind": "replay", "path": str(_frames_dir(tmp_path)), "fps": 15, "loop": True},
            "publish": {"endpoints": [f"ipc://{tmp_path}/masks"]},
            "control": {"endpoint": f"ipc://{tmp_path}/control"},
            "model": {"fallback_engines": ["torch"], "max_consecutive_failures": 3},
            "prompts": ["lungs"],
        },
    )
    app = build_app(settings, bundle=bundle)
    chain = app.node.engine
    fallback = chain.fallbacks[0].engine
    chain.active = broken = BrokenEngine(chain.active, mode)
    sub = Subscriber(f"ipc://{tmp_path}/masks", topic="carm0")
    try:
        time.sleep(0.2)
        app.start()
        msg = sub.receive(timeout=60)  # the first frame that comes out is the fallback's
        status = app.control.handle(b'{"cmd": "status"}')["status"]
    finally:
        sub.close()
        final = app.stop()
    assert_accounting(final)
    reason = "engine_error" if mode == "raise" else "nonfinite_output"
    assert final["dropped"].get(reason) == 3  # exactly N failures, then the switch
    assert broken.calls == 3
    assert chain.active is fallback
    assert status["engine_switches"] == [
        {"from": broken.name, "to": "torch", "reason": status["engine_switches"][0]["reason"]}
    ]
    assert status["engine"]["engine"] == "torch"
    assert broken.name in status["last_error"]
    assert msg.prompts[0].mask.shape == (96, 96)
    assert final["published"] >= 1


def test_failures_that_are_not_in_a_row_do_not_switch(tmp_path, bundle):
    """Alternating failure/success resets the count: one glitch a second must not swap engines."""

    class EveryOther(BrokenEngine):
        def encode_image(self, x):
            self.calls += 1
            if self.calls % 2:
                raise RuntimeError("transient")
            return self.inner.encode_image(x)

    source = {"kind": "replay", "path": str(_frames_dir(tmp_path)), "fps": 15, "loop": True}
    with running_node(tmp_path, bundle, source) as (app, _sub):
        chain = app.node.engine
        chain.max_consecutive_failures = 2
        chain.fallbacks = [Loaded(chain.active)]
        chain.active = flaky = EveryOther(chain.active, "raise")
        wait_for(lambda: flaky.calls >= 8, 60, "8 engine calls")
        assert chain.switches == []
        assert chain.active is flaky
    assert app.final["dropped"]["engine_error"] >= 4


# --------------------------------------------------------------------------- signals


def _serve(tmp_path: Path, checkpoint: Path, prelude: str = "") -> subprocess.Popen:
    """``fluorosam-rt serve`` on a looping replay, in a subprocess; prelude runs before main()."""
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(f"source: {{kind: replay, path: '{_frames_dir(tmp_path)}', fps: 10, loop: true}}\n")
    args = [
        "serve",
        "--config",
        str(cfg),
        "--publish",
        f"ipc://{tmp_path}/masks",
        "--control",
        f"ipc://{tmp_path}/control",
        "--prompt",
        "lungs",
        "--checkpoint",
        str(checkpoint),
        "--keep-running",
        "--max-seconds",
        "120",
    ]
    code = f"import sys, time\n{prelude}\nfrom fluorosam_rt.cli import main\nsys.exit(main({args!r}))"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_serve_cleanly(tmp_path, checkpoint, sig):
    proc = _serve(tmp_path, checkpoint)
    sub = None
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready"
        sub = Subscriber(f"ipc://{tmp_path}/masks", topic="carm0")
        sub.receive(timeout=60)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if sub is not None:
            sub.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["event"] == "stopped"
    assert_accounting(final)
    assert final["published"] >= 1
    # Sockets are closed: the endpoints can be bound again at once. (The ipc files may remain:
    # libzmq unlinks them on its I/O thread, which the exiting process does not wait for; a
    # stale file is harmless, the next bind replaces it.)
    import zmq

    ctx = zmq.Context.instance()
    for name in ("masks", "control"):
        s = ctx.socket(zmq.PUB)
        try:
            s.bind(f"ipc://{tmp_path}/{name}")
        finally:
            s.close(linger=0)


@pytest.mark.parametrize("level", ["DEBUG", None], ids=["debug", "default"])
def test_serve_log_level_shows_the_dicom_receipt_line(tmp_path, checkpoint, level):
    """``serve --log-level DEBUG`` configures logging: the DICOM source's receipt line reaches
    stderr with a timestamp (and no patient identifier: log_patient_identifiers is off). The
    default, INFO, shows pynetdicom's per-object line but not the DEBUG receipt line."""
    cfg = tmp_path / "dicom.yaml"
    cfg.write_text("source: {kind: dicom, host: 127.0.0.1, port: 0, ae_title: FSAMTEST}\n")
    args = ["serve", "--config", str(cfg), "--publish", f"ipc://{tmp_path}/masks", "--control", "none"]
    args += ["--prompt", "lungs", "--checkpoint", str(checkpoint), "--max-seconds", "120"]
    args += ["--log-level", level.lower()] if level else []  # (case-insensitive)
    cine = tmp_path / "cine.dcm"
    multiframe_xa(cine, n_frames=1)  # PatientID TEST123
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err_file:  # a file, not a pipe: DEBUG writes hundreds of lines
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluorosam_rt.cli", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
        )
        try:
            ready = json.loads(proc.stdout.readline())
            assert ready["event"] == "ready", err_path.read_text()
            port = int(ready["source"]["address"].rpartition(":")[2])
            assert storescu(port, cine).returncode == 0
            wait_for(lambda: "Association Released" in err_path.read_text(), 30, "the association to end")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    err = err_path.read_text()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["received"] == 1
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    receipt = stamp + r" DEBUG fluorosam_rt\.sources\.dicom_scp: C-STORE from CARM1: status 0x0000"
    assert re.search(stamp + r" INFO pynetdicom\S*: Received Store Request", err), err[-3000:]
    if level == "DEBUG":
        assert re.search(receipt, err), err[-3000:]
        assert "TEST123" not in err
    else:
        assert "C-STORE from CARM1" not in err
        assert " DEBUG " not in err


STUCK_STOP_S = 60  # how long the stuck stop below would hang


def test_second_signal_forces_exit(tmp_path, checkpoint):
    """A stop that hangs (a stuck device driver, say) is cut short by a second signal."""
    prelude = (
        "import fluorosam_rt.service.node as _n\n"
        "_orig = _n.Node.stop\n"
        "def _stuck(self, *a, **k):\n"
        f"    print('stopping', flush=True); time.sleep({STUCK_STOP_S}); return _orig(self, *a, **k)\n"
        "_n.Node.stop = _stuck\n"
    )
    proc = _serve(tmp_path, checkpoint, prelude)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "stopping"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=0.75 * STUCK_STOP_S)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 130
    # Cut short: well before the stuck stop would have returned by itself (a ratio to it, not a
    # wall-clock bound that a loaded machine could miss).
    assert elapsed < 0.75 * STUCK_STOP_S
