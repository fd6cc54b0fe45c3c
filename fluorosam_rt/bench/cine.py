"""An XA cine at 30 fps through the real node, uncompressed and JPEG Lossless side by side (issue 20).

``bench-decode`` times decoding one frame in isolation; this answers the question a site asks:
with the cine an angiography system archives (multi-frame XA, 12-16 bit, JPEG Lossless SV1),
does the node still keep its latency goal, and how much p99 does decoding add? So the same
frames are sent twice, once as Explicit VR Little Endian and once JPEG Lossless SV1 (encoded by
dcmtk's ``dcmcjpeg +e1``, as archives do), by dcmtk's ``storescu`` to a real ``fluorosam-rt
serve`` process (DICOM source, embedded model, 3 prompts), and a recorder-style subscriber keeps
every message. Runs alternate ABBA so a drift in the machine's load weighs on both alike.

What the SCP does with a cine (sources/dicom_scp.py): it decodes *every* frame of the object
before answering the C-STORE, then plays the frames into the stream at the cine's rate. So
decoding shows up as a delay before the first frame plays, not as a per-frame cost on the
node's frame path. Two latencies are therefore reported, per published frame ``i``:

* ``frame``: node entry (the message's ``received`` stamp) -> the subscriber has the message.
  The node's own end-to-end latency, the one its goal applies to.
* ``cine``: the moment ``storescu`` was started plus ``i`` frame periods -> the subscriber has
  the message. How late each mask is against a 30 fps stream that began when the sender began
  sending: transfer, the whole object's decode, pacing and the node together.

``p99 added by decoding`` is compressed p99 minus uncompressed p99 of each, from the same run.
Decode time per frame is measured in this process on the very bytes sent (pydicom with the first
decoder plugin the node uses), and so is the whole-object ingest the SCP does before answering.
The ``source`` stamp is also reported (``source_to_subscriber``), with what it meant in the run
(``source_stamp``): the frame played into the stream, or an earlier time such as C-STORE arrival.

Accounting must close per cine: frames sent = emitted by the source = received by the node =
published + dropped (each with a reason), and the subscriber holds exactly the published frames
(by frame index, so a missing message is named). The command exits 1 when it does not.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .procs import load_average

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
UNCOMPRESSED = "explicit"
COMPRESSED = "jpeg_lossless_sv1"
# Encoders for the cine: dcmtk tools that write multi-frame objects (the same ones bench-decode
# and the tests use). None: the uncompressed file is written as is.
ENCODERS: dict[str, list[str] | None] = {
    "explicit": None,
    "jpeg_lossless_sv1": ["dcmcjpeg", "+e1"],
    "jpeg_lossless": ["dcmcjpeg", "+el"],
    "jpegls_lossless": ["dcmcjpls", "+el"],
    "rle": ["dcmcrle"],
}
DEFAULT_PROMPTS = ("lungs", "heart", "spine")
AE_TITLE = "FSAMCINE"
INTERVALS = {
    "frame": "node entry (message timestamps_ns['received']) -> message received by the subscriber",
    "cine": "storescu started + frame_index / fps -> message received by the subscriber "
    "(transfer, whole-object decode, pacing, node, transport)",
    "node": "timestamps_ns['received'] -> timestamps_ns['published'] (inside the node)",
    "source_to_subscriber": "timestamps_ns['source'] -> message received by the subscriber "
    "(see source_stamp for what 'source' meant in this run)",
}


class CineBenchError(RuntimeError):
    """A cine run that could not be set up or finished; the message says which step and why."""


@dataclass
class CineOptions:
    size: int = 1024
    frames: int = 90
    bits: int = 12
    fps: float = 30.0
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    engine: str = "onnxruntime"
    checkpoint: str | None = None  # None: the embedded default model
    repeats: int = 2  # runs per syntax, ABBA order
    syntaxes: tuple[str, str] = (UNCOMPRESSED, COMPRESSED)
    warmup_frames: int = 10  # one uncounted cine first (engine warm-up), 0: none
    image: str | None = None  # gray image the frames are made from (default: a shared radiograph)
    json_path: str | None = None
    timeout_s: float = 300.0  # per cine, from send to the last message
    argv: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the cine


def _base_image(size: int, image: str | None) -> tuple[np.ndarray, str]:
    """A float image in [0, 1]: a real chest radiograph when one is at hand, else smooth noise."""
    import cv2

    from .harness import REPO_ROOT

    path = Path(image) if image else None
    if path is None:
        shared = REPO_ROOT.parent / "shared" / "data" / "chest-xray-hannover" / "images"
        found = sorted(shared.glob("*.png"))
        path = found[0] if found else None
    elif not path.is_file():
        raise CineBenchError(f"no image file {path}")
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path is not None else None
    if img is None:
        rng = np.random.default_rng(0)
        img = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), size / 16)
        origin = f"synthetic smooth image {size}x{size}"
    else:
        origin = f"{path.name} resized to {size}x{size}"
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    img = cv2.resize(img.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / max(hi - lo, 1e-6), origin


def cine_pixels(size: int, n_frames: int, bits: int, image: str | None = None) -> tuple[np.ndarray, str]:
    """(frames, description): a fluoroscopy-like cine, so compression ratios are realistic.

    The image moves as with breathing (a vertical shift, 4 s period at 30 fps) and each frame has
    its own quantum-like noise (0.5 % of the range): random 12-bit noise would not compress, a
    still image would compress far better than any real cine.
    """
    if not 8 < bits <= 16:
        raise CineBenchError(f"--bits must be 9..16 (X-ray cine), not {bits}")
    base, origin = _base_image(size, image)
    top = 2**bits - 1
    rng = np.random.default_rng(0)
    out = np.empty((n_frames, size, size), np.uint16)
    for i in range(n_frames):
        dy = round(0.02 * size * np.sin(2 * np.pi * i / 120))
        img = np.roll(base, dy, axis=0) * (0.8 * top) + 0.1 * top
        img += rng.normal(0.0, 0.005 * top, img.shape)
        out[i] = np.clip(img, 0, top).astype(np.uint16)
    return out, f"{origin}, {bits}-bit, breathing shift and noise"


def write_cine(path: Path, pixels: np.ndarray, bits: int, fps: float) -> str:
    """An uncompressed multi-frame XA object (Explicit VR LE) with the geometry a C-arm sends;
    returns its SOP Instance UID."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    n, rows, cols = pixels.shape
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = XA_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "XA"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.FrameTime = round(1000.0 / fps, 3)  # the cine's own rate, as an XA object records it
    ds.CineRate = round(fps)
    ds.ImagerPixelSpacing = [0.3, 0.3]
    ds.DistanceSourceToDetector, ds.DistanceSourceToPatient = 1200, 800
    ds.PositionerPrimaryAngle, ds.PositionerSecondaryAngle = 30, -5
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def encode_cine(raw: Path, key: str, out: Path) -> None:
    """The same cine in syntax ``key`` (dcmtk for the compressed ones)."""
    if key not in ENCODERS:
        raise CineBenchError(f"no cine encoder for syntax {key!r}; known: {sorted(ENCODERS)}")
    cmd = ENCODERS[key]
    if cmd is None:
        shutil.copyfile(raw, out)
        return
    if shutil.which(cmd[0]) is None:
        raise CineBenchError(f"{cmd[0]} (dcmtk) is not installed; it encodes the {key} cine")
    proc = subprocess.run([*cmd, str(raw), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CineBenchError(f"{cmd[0]} failed on the cine: {proc.stderr.strip()[:200]}")


def with_new_uid(src: Path, out: Path) -> str:
    """A copy with a fresh SOP Instance UID, so each run's messages can be told apart."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return str(ds.SOPInstanceUID)


def decode_times(path: Path) -> dict[str, Any]:
    """Per-frame decode and whole-object ingest (what the SCP does before answering), in ms."""
    import pydicom
    from pydicom.pixels import pixel_array

    from ..dicom_codecs import decoder_plugins
    from ..sources.dicom_frames import dataset_frames

    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    uid = str(ds.file_meta.TransferSyntaxUID)
    plugins = decoder_plugins(uid)
    first = plugins[0] if plugins and plugins[0] != "pydicom" else ""
    n = int(ds.NumberOfFrames)
    kw = {"decoding_plugin": first} if first else {}
    pixel_array(ds, index=0, **kw)  # warm-up: imports, plugin set-up
    per_frame = []
    for i in range(n):
        t0 = time.perf_counter()
        pixel_array(ds, index=i, **kw)
        per_frame.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    frames = dataset_frames(pydicom.dcmread(io.BytesIO(data)))
    ingest = (time.perf_counter() - t0) * 1000
    if len(frames) != n:
        raise CineBenchError(f"ingest gave {len(frames)} frames for a {n}-frame cine")
    return {
        "decoder": plugins[0] if plugins else "",
        "decode_ms_p50": _q(per_frame, 50),
        "decode_ms_p99": _q(per_frame, 99),
        "decode_ms_total": round(float(sum(per_frame)), 2),
        "object_ingest_ms": round(ingest, 2),
    }


def _q(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 2) if len(values) else None


# --------------------------------------------------------------------------- node, sender, subscriber


class Recorder:
    """A subscriber that keeps every message (high receive queue, never 'newest only'), stamping
    each with its wall-clock arrival; runs in a thread of the bench process, which is otherwise
    idle while a cine plays."""

    def __init__(self, endpoint: str, topic: str) -> None:
        from bridge import Subscriber

        self._sub = Subscriber(endpoint, topic=topic, rcvhwm=100_000)
        self.rows: list[dict[str, Any]] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cine-recorder", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from bridge import SubscriberTimeout

        while not self._stop.is_set():
            try:
                msg = self._sub.receive(timeout=0.1, newest=False)
            except SubscriberTimeout:
                continue
            except Exception:  # a message this side cannot read is counted; the run goes on
                self.errors += 1
                continue
            wall = time.time_ns()
            row = {
                "frame_id": msg.frame_id,
                "seq": msg.seq,
                "uid": str(msg.source.get("SOPInstanceUID", "")),
                "frame_index": int(msg.source.get("frame_index", -1)),
                "num_frames": int(msg.source.get("num_frames", 0)),
                "ts_uid": str(msg.source.get("TransferSyntaxUID", "")),
                "t": dict(msg.timestamps_ns),
                "recv_ns": wall,
                "prompts": len(msg.prompts),
            }
            with self._lock:
                self.rows.append(row)

    def for_uid(self, uid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.rows if r["uid"] == uid]

    @property
    def lost(self) -> int:
        return int(self._sub.lost)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close()


@dataclass
class NodeProcess:
    """``fluorosam-rt serve`` with a DICOM source, as a site runs it."""

    proc: subprocess.Popen
    port: int
    control: str
    masks: str
    stream: str
    log: Path
    final: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        from ..service.control import send_command

        return send_command(self.control, {"cmd": "status"}, timeout=30)["status"]

    def stop(self) -> dict[str, Any]:
        from ..service.control import send_command

        try:
            send_command(self.control, {"cmd": "shutdown"}, timeout=10)
            out, _ = self.proc.communicate(timeout=60)
            for line in out.splitlines():
                if line.strip().startswith("{") and '"stopped"' in line:
                    self.final = json.loads(line)
        except (TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        return self.final


def start_node(work: Path, opts: CineOptions) -> NodeProcess:
    from .harness import read_json_line, subprocess_env

    masks, control, stream = f"ipc://{work}/masks", f"ipc://{work}/control", "cine"
    settings = {
        "stream": stream,
        "source": {
            "kind": "dicom",
            "host": "127.0.0.1",
            "port": 0,
            "ae_title": AE_TITLE,
            "multiframe_fps": opts.fps,
        },
        "model": {"checkpoint": opts.checkpoint, "engine": opts.engine},
        # A recorder's settings: the node queues up to 1000 messages for a subscriber rather
        # than dropping, so every published frame can be checked at the subscriber.
        "publish": {"endpoints": [masks], "sndhwm": 1000},
        "control": {"endpoint": control},
        "prompts": list(opts.prompts),
    }
    cfg = work / "node.yaml"
    cfg.write_text(json.dumps(settings))  # JSON is YAML
    log = work / "node.log"
    with open(log, "w") as log_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fluorosam_rt.cli", "serve", "--config", str(cfg), "--keep-running"],
            stdout=subprocess.PIPE,
            stderr=log_f,
            text=True,
            env=subprocess_env(),
        )
    try:
        ready = read_json_line(proc, 300, f"the node ({opts.engine}; log {log})")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        tail = log.read_text()[-1500:] if log.is_file() else ""
        raise CineBenchError(f"the node did not start: {tail.strip().splitlines()[-1:] or ''}") from None
    port = int(ready["source"]["address"].rpartition(":")[2])
    return NodeProcess(proc=proc, port=port, control=control, masks=masks, stream=stream, log=log)


def send_cine(port: int, path: Path, ts_uid: str, work: Path) -> tuple[int, int, float, str]:
    """storescu proposing exactly the file's own syntax; (storescu exit code, wall ns at start,
    seconds it took, stderr tail). The C-STORE answer comes after the SCP decoded every frame."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise CineBenchError("storescu (dcmtk) is not installed; it sends the cine")
    cfg = work / f"propose_{ts_uid}.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + ts_uid + "\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + XA_SOP_CLASS + "\\TS\n"
        "[[Profiles]]\n[P]\nPresentationContexts = PC\n"
    )
    cmd = [
        storescu,
        "-xf",
        str(cfg),
        "P",
        "-aec",
        AE_TITLE,
        "-aet",
        "CARM1",
        "127.0.0.1",
        str(port),
        str(path),
    ]
    t0 = time.time_ns()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return proc.returncode, t0, (time.time_ns() - t0) / 1e9, proc.stderr.strip()[-300:]


# --------------------------------------------------------------------------- one cine


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise CineBenchError(f"timed out after {timeout:.0f} s waiting for {what}")


def _counts(status: dict[str, Any]) -> dict[str, Any]:
    return {
        "emitted": int(status["source"].get("emitted", 0)),
        "rejected": dict(status["source"].get("rejected", {})),
        "received": int(status["received"]),
        "published": int(status["published"]),
        "dropped": dict(status["dropped"]),
    }


def account(
    sent: int, before: dict[str, Any], after: dict[str, Any], rows: list[dict[str, Any]], lost: int
) -> dict[str, Any]:
    """Frames of one cine from sender to subscriber; ``closed`` only if every count agrees.

    ``before``/``after`` are the node's counts (``_counts``) around the cine, ``rows`` the
    subscriber's messages for the cine's SOP Instance UID.
    """
    reasons = set(before["dropped"]) | set(after["dropped"])
    by_reason = {k: after["dropped"].get(k, 0) - before["dropped"].get(k, 0) for k in sorted(reasons)}
    by_reason = {k: v for k, v in by_reason.items() if v}
    rejected = {
        k: after["rejected"].get(k, 0) - before["rejected"].get(k, 0)
        for k in sorted(set(before["rejected"]) | set(after["rejected"]))
    }
    rejected = {k: v for k, v in rejected.items() if v}
    emitted = after["emitted"] - before["emitted"]
    received = after["received"] - before["received"]
    published = after["published"] - before["published"]
    dropped = sum(by_reason.values())
    indices = [r["frame_index"] for r in rows]
    seen = set(indices)
    duplicates = len(indices) - len(seen)
    out_of_range = sorted(i for i in seen if not 0 <= i < sent)
    not_published = [i for i in range(sent) if i not in seen]
    problems = []
    if emitted != sent:
        problems.append(f"source emitted {emitted} of {sent} frames sent")
    if received != emitted:
        problems.append(f"node received {received}, source emitted {emitted}")
    if published + dropped != received:
        problems.append(f"published {published} + dropped {dropped} != received {received}")
    if len(rows) != published:
        problems.append(f"subscriber holds {len(rows)} messages, node published {published}")
    if len(not_published) != dropped:
        problems.append(f"{len(not_published)} frame indices never reached the subscriber, {dropped} dropped")
    if duplicates or out_of_range:
        problems.append(f"{duplicates} duplicate and {len(out_of_range)} unknown frame indices")
    if rejected:
        problems.append(f"source rejected {rejected}")
    if lost:
        problems.append(f"subscriber saw {lost} lost messages (seq gaps)")
    return {
        "sent": sent,
        "emitted": emitted,
        "received": received,
        "published": published,
        "dropped": dropped,
        "dropped_by_reason": by_reason,
        "subscriber_received": len(rows),
        "subscriber_lost": lost,
        "not_published_frame_indices": not_published,
        "closed": not problems,
        "problems": problems,
    }


def latencies(rows: list[dict[str, Any]], t_send_ns: int, fps: float) -> dict[str, list[float]]:
    """Per published frame, in ms: the intervals named in :data:`INTERVALS`."""
    period_ns = 1e9 / fps
    out: dict[str, list[float]] = {k: [] for k in INTERVALS}
    out["received_minus_source"] = []
    out["play_start"] = []
    for r in sorted(rows, key=lambda r: r["frame_index"]):
        t, i = r["t"], r["frame_index"]
        out["frame"].append((r["recv_ns"] - t["received"]) / 1e6)
        out["cine"].append((r["recv_ns"] - (t_send_ns + i * period_ns)) / 1e6)
        out["node"].append((t["published"] - t["received"]) / 1e6)
        out["source_to_subscriber"].append((r["recv_ns"] - t["source"]) / 1e6)
        out["received_minus_source"].append((t["received"] - t["source"]) / 1e6)
        # when frame 0 would have entered the node, judged from frame i: send -> cine starts playing
        out["play_start"].append((t["received"] - i * period_ns - t_send_ns) / 1e6)
    return out


def run_cine(
    node: NodeProcess, rec: Recorder, path: Path, uid: str, ts_uid: str, n: int, opts: CineOptions, work: Path
) -> dict[str, Any]:
    """Send one cine, wait until the node has accounted for every frame and the subscriber holds
    every published one; its accounting and latencies."""
    load = load_average()
    before = _counts(node.status())
    lost0 = rec.lost
    rc, t_send, took, err = send_cine(node.port, path, ts_uid, work)
    if rc != 0:
        raise CineBenchError(f"storescu exited {rc} sending {path.name}: {err}")
    time.sleep(max(0.0, n / opts.fps - 0.5))  # the cine plays; no control traffic meanwhile

    def settled() -> bool:
        s = node.status()
        c = _counts(s)
        return (
            c["emitted"] - before["emitted"] >= n
            and c["received"] - before["received"] >= n
            and int(s["source"].get("pending_frames", 0)) == 0
            and int(s["in_flight"]) == 0
        )

    _wait(settled, opts.timeout_s, f"the node to account for the {n} frames of {path.name}")
    after = _counts(node.status())
    published = after["published"] - before["published"]
    with contextlib.suppress(CineBenchError):  # a message that never comes is counted below
        _wait(lambda: len(rec.for_uid(uid)) >= published, 30, "every published message")
    time.sleep(0.2)  # anything extra (a duplicate) would arrive now
    rows = rec.for_uid(uid)
    acc = account(n, before, after, rows, rec.lost - lost0)
    bad_ts = sorted({r["ts_uid"] for r in rows} - {ts_uid})
    if bad_ts:
        acc["closed"] = False
        acc["problems"].append(f"messages carry transfer syntax {bad_ts}, {ts_uid} was sent")
    lat = latencies(rows, t_send, opts.fps)
    return {
        "uid": uid,
        "bytes": path.stat().st_size,
        "storescu_s": round(took, 3),
        "load_average": load,
        "accounting": acc,
        "p50_p99_ms": {k: [_q(lat[k], 50), _q(lat[k], 99)] for k in ("frame", "cine", "node")},
        "latency_ms": lat,
    }


# --------------------------------------------------------------------------- the benchmark


def _order(keys: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """ABBA...: (run, syntax) pairs so a linear drift in load weighs on both syntaxes alike."""
    out = []
    for r in range(repeats):
        out += [(r, k) for k in (keys if r % 2 == 0 else list(reversed(keys)))]
    return out


def _summary(cines: list[dict[str, Any]]) -> dict[str, Any]:
    acc = [c["accounting"] for c in cines]
    reasons: dict[str, int] = {}
    for a in acc:
        for k, v in a["dropped_by_reason"].items():
            reasons[k] = reasons.get(k, 0) + v
    lat = {k: [x for c in cines for x in c["latency_ms"][k]] for k in (*INTERVALS, "play_start")}
    out: dict[str, Any] = {
        "cines": len(cines),
        **{k: sum(a[k] for a in acc) for k in ("sent", "emitted", "received", "published", "dropped")},
        "dropped_by_reason": reasons,
        "subscriber_received": sum(a["subscriber_received"] for a in acc),
        "accounting_closed": all(a["closed"] for a in acc),
        "storescu_s_median": _q([c["storescu_s"] for c in cines], 50),
        "bytes": cines[0]["bytes"] if cines else None,
    }
    for k in INTERVALS:
        out[f"{k}_ms_p50"] = _q(lat[k], 50)
        out[f"{k}_ms_p99"] = _q(lat[k], 99)
        out[f"{k}_ms_max"] = _q(lat[k], 100)
    out["play_start_ms_median"] = _q(lat["play_start"], 50)
    out["latency_samples"] = len(lat["frame"])
    return out


def _source_stamp(cines: list[dict[str, Any]]) -> str:
    gaps = [x for c in cines for x in c["latency_ms"]["received_minus_source"]]
    if not gaps:
        return "unknown (no frame published)"
    med = float(np.median(gaps))
    if med < 5.0:
        return f"the frame played into the stream (received - source: median {med:.2f} ms)"
    return (
        "earlier than the frame entered the node, e.g. C-STORE arrival "
        f"(received - source: median {med:.1f} ms)"
    )


def run_cine_benchmark(opts: CineOptions, progress: Any = print) -> dict[str, Any]:
    """The whole run; returns the result (also written to ``opts.json_path``)."""
    from ..dicom_codecs import SYNTAX_BY_KEY, decoder_plugins
    from .harness import code_version

    for key in opts.syntaxes:
        if key not in SYNTAX_BY_KEY or key not in ENCODERS:
            raise CineBenchError(f"unknown cine syntax {key!r}; known: {sorted(ENCODERS)}")
        if not decoder_plugins(SYNTAX_BY_KEY[key].uid):
            raise CineBenchError(f"no decoder installed for {key}: the node would refuse it")
    if opts.frames < 1 or opts.repeats < 1 or opts.fps <= 0 or opts.size < 8:
        raise CineBenchError("--frames and --repeats must be >= 1, --fps > 0, --size >= 8")
    work = Path(tempfile.mkdtemp(prefix="fsam-cine-"))
    t_start = time.monotonic()
    result: dict[str, Any] = {
        "version": 1,
        "command": opts.argv,
        "code": code_version(),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "load_before": load_average()},
        "intervals": INTERVALS,
    }
    node: NodeProcess | None = None
    rec: Recorder | None = None
    try:
        pixels, origin = cine_pixels(opts.size, opts.frames, opts.bits, opts.image)
        raw = work / "cine_raw.dcm"
        write_cine(raw, pixels, opts.bits, opts.fps)
        files, decode = {}, {}
        raw_bytes = pixels.nbytes
        for key in opts.syntaxes:
            files[key] = work / f"cine_{key}.dcm"
            encode_cine(raw, key, files[key])
            decode[key] = {
                **decode_times(files[key]),
                "bytes": files[key].stat().st_size,
                "ratio": round(raw_bytes / files[key].stat().st_size, 2),
            }
            progress(
                f"{key:18s} {decode[key]['bytes'] / 1e6:7.1f} MB (ratio {decode[key]['ratio']:.2f})  "
                f"decode p50 {decode[key]['decode_ms_p50']} ms/frame  object ingest "
                f"{decode[key]['object_ingest_ms']:.0f} ms"
            )
        result["config"] = {
            "frames": opts.frames,
            "size": opts.size,
            "bits": opts.bits,
            "fps": opts.fps,
            "frame_time_ms": round(1000.0 / opts.fps, 3),
            "prompts": list(opts.prompts),
            "engine": opts.engine,
            "model": opts.checkpoint or "embedded default model",
            "repeats": opts.repeats,
            "order": [f"{k}#{r}" for r, k in _order(opts.syntaxes, opts.repeats)],
            "warmup_frames": opts.warmup_frames,
            "pixels": origin,
            "sender": "dcmtk storescu, one presentation context in the file's own syntax",
            "subscriber": "recorder thread in the bench process (rcvhwm 100000, every message)",
        }
        progress(f"starting the node ({opts.engine}, {len(opts.prompts)} prompts) ...")
        node = start_node(work, opts)
        rec = Recorder(node.masks, node.stream)
        time.sleep(0.3)  # the subscription reaches the publisher before the first frame
        ts = {k: SYNTAX_BY_KEY[k].uid for k in opts.syntaxes}
        if opts.warmup_frames:
            wpath = work / "warmup.dcm"
            w_uid = write_cine(wpath, pixels[: opts.warmup_frames], opts.bits, opts.fps)
            w_ts = SYNTAX_BY_KEY[UNCOMPRESSED].uid
            w = run_cine(node, rec, wpath, w_uid, w_ts, opts.warmup_frames, opts, work)
            result["warmup"] = {"accounting": w["accounting"]}
            progress(f"warm-up cine: {_line(w)}")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in opts.syntaxes}
        for r, key in _order(opts.syntaxes, opts.repeats):
            path = work / f"run{r}_{key}.dcm"
            uid = with_new_uid(files[key], path)
            c = run_cine(node, rec, path, uid, ts[key], opts.frames, opts, work)
            c["run"] = r
            runs[key].append(c)
            progress(f"{key:18s} run {r}: {_line(c)}")
            path.unlink()
        result["machine"]["load_after"] = load_average()
        final = result["node_final"] = node.stop()
        node = None
        total_sent = opts.warmup_frames + opts.frames * opts.repeats * len(opts.syntaxes)
        # The node's own books at shutdown, against what was sent over the whole run.
        result["node_final_closed"] = bool(final) and (
            final.get("source_emitted") == final.get("received") == total_sent
            and final.get("published", 0) + final.get("dropped_total", 0) == total_sent
            and final.get("in_flight") == 0
        )
        per = {}
        for key in opts.syntaxes:
            per[key] = {**_summary(runs[key]), **{k: v for k, v in decode[key].items() if k != "bytes"}}
        result["syntaxes"] = per
        result["source_stamp"] = _source_stamp([c for cs in runs.values() for c in cs])
        a, b = opts.syntaxes
        result["p99_added_by_decoding_ms"] = {
            k: _diff(per[b][f"{k}_ms_p99"], per[a][f"{k}_ms_p99"]) for k in INTERVALS
        }
        result["p99_added_by_decoding_per_run_ms"] = [
            {
                "run": ra["run"],
                "frame": _diff(_q(rb["latency_ms"]["frame"], 99), _q(ra["latency_ms"]["frame"], 99)),
                "cine": _diff(_q(rb["latency_ms"]["cine"], 99), _q(ra["latency_ms"]["cine"], 99)),
            }
            for ra, rb in zip(runs[a], runs[b])
        ]
        result["compared"] = {"baseline": a, "compressed": b}
        result["accounting_closed"] = (
            all(per[k]["accounting_closed"] for k in opts.syntaxes)
            and result.get("warmup", {}).get("accounting", {}).get("closed", True)
            and result["node_final_closed"]
        )
        result["cines"] = {
            k: [{kk: vv for kk, vv in c.items() if kk != "latency_ms"} for c in runs[k]]
            for k in opts.syntaxes
        }
        result["elapsed_s"] = round(time.monotonic() - t_start, 1)
        return result
    finally:
        if rec is not None:
            rec.close()
        if node is not None:
            node.stop()
        if opts.json_path and "syntaxes" in result:
            Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(opts.json_path).write_text(json.dumps(result, indent=2))
        shutil.rmtree(work, ignore_errors=True)


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else round(x - y, 2)


def _line(c: dict[str, Any]) -> str:
    a, lat = c["accounting"], c["latency_ms"]
    return (
        f"sent {a['sent']} published {a['published']} dropped {a['dropped']} {a['dropped_by_reason'] or ''}"
        f" subscriber {a['subscriber_received']}"
        f"  frame p50/p99 {_q(lat['frame'], 50)}/{_q(lat['frame'], 99)} ms"
        f"  cine p99 {_q(lat['cine'], 99)} ms  storescu {c['storescu_s']} s  load {c['load_average']}"
        + ("" if a["closed"] else f"  ACCOUNTING OPEN: {'; '.join(a['problems'])}")
    )


def format_table(result: dict[str, Any]) -> str:
    """The side-by-side table the command prints."""
    per, cfg = result["syntaxes"], result["config"]
    keys = list(per)
    rows = [
        ("bytes per cine", lambda s: f"{s['bytes'] / 1e6:.1f} MB"),
        ("compression ratio", lambda s: f"{s['ratio']:.2f}"),
        ("decoder", lambda s: s["decoder"]),
        ("decode ms/frame p50 / p99", lambda s: f"{s['decode_ms_p50']} / {s['decode_ms_p99']}"),
        ("object ingest ms (SCP, before answer)", lambda s: f"{s['object_ingest_ms']:.0f}"),
        ("storescu s (send + ingest), median", lambda s: f"{s['storescu_s_median']}"),
        ("frames sent / received", lambda s: f"{s['sent']} / {s['received']}"),
        ("published / dropped", lambda s: f"{s['published']} / {s['dropped']}"),
        (
            "dropped by reason",
            lambda s: ", ".join(f"{k} {v}" for k, v in s["dropped_by_reason"].items()) or "-",
        ),
        ("subscriber received", lambda s: f"{s['subscriber_received']}"),
        ("accounting closed", lambda s: "yes" if s["accounting_closed"] else "NO"),
        ("frame latency ms p50 / p99", lambda s: f"{s['frame_ms_p50']} / {s['frame_ms_p99']}"),
        ("node received->published ms p50 / p99", lambda s: f"{s['node_ms_p50']} / {s['node_ms_p99']}"),
        ("cine latency ms p50 / p99", lambda s: f"{s['cine_ms_p50']} / {s['cine_ms_p99']}"),
        (
            "source -> subscriber ms p50 / p99",
            lambda s: f"{s['source_to_subscriber_ms_p50']} / {s['source_to_subscriber_ms_p99']}",
        ),
        ("send -> cine starts playing ms", lambda s: f"{s['play_start_ms_median']}"),
        ("latency samples", lambda s: f"{s['latency_samples']}"),
    ]
    w = max(len(r[0]) for r in rows)
    cw = max(24, *(len(fmt(per[k])) for _, fmt in rows for k in keys))
    lines = [
        f"XA cine {cfg['frames']} x {cfg['size']}x{cfg['size']} {cfg['bits']}-bit at {cfg['fps']:g} fps, "
        f"{len(cfg['prompts'])} prompts ({', '.join(cfg['prompts'])}), {cfg['engine']}, "
        f"{cfg['repeats']} runs each ({' '.join(cfg['order'])}); load {result['machine']['load_before']}"
        f" -> {result['machine'].get('load_after')}",
        f"{'':{w}}  " + "  ".join(f"{k:>{cw}}" for k in keys),
    ]
    for name, fmt in rows:
        lines.append(f"{name:{w}}  " + "  ".join(f"{fmt(per[k]):>{cw}}" for k in keys))
    add = result["p99_added_by_decoding_ms"]
    lines.append(
        f"p99 added by decoding ({keys[1]} - {keys[0]}): frame {add['frame']} ms, "
        f"cine {add['cine']} ms, node {add['node']} ms"
        + (
            f", source -> subscriber {add['source_to_subscriber']} ms"
            if "source_to_subscriber" in add
            else ""
        )
    )
    lines.append(f"'source' stamp in this run: {result['source_stamp']}")
    return "\n".join(lines)


def run_from_args(args: Any) -> int:
    """``fluorosam-rt bench-cine``: prints the table, writes JSON; 1 if any accounting is open."""
    syntaxes = tuple(k.strip() for k in args.syntaxes.split(","))
    if len(syntaxes) != 2:
        raise SystemExit(
            "bench-cine: --syntaxes takes two keys, baseline first (e.g. explicit,jpeg_lossless_sv1)"
        )
    prompts = tuple(p.strip() for p in args.prompts.split(",") if p.strip())
    opts = CineOptions(
        size=args.size,
        frames=args.frames,
        bits=args.bits,
        fps=args.fps,
        prompts=prompts,
        engine=args.engine,
        checkpoint=args.checkpoint,
        repeats=args.repeats,
        syntaxes=syntaxes,  # type: ignore[arg-type]
        warmup_frames=args.warmup_frames,
        image=args.image,
        json_path=args.json,
        argv=["fluorosam-rt", "bench-cine", *sys.argv[2:]],
    )
    try:
        result = run_cine_benchmark(opts)
    except CineBenchError as exc:
        raise SystemExit(f"bench-cine: {exc}") from None
    print(format_table(result))
    if opts.json_path:
        print(f"wrote {opts.json_path}")
    if not result["accounting_closed"]:
        print("bench-cine: accounting did not close (see 'problems' in the JSON)", file=sys.stderr)
        return 1
    return 0


def add_cine_parser(sub: Any) -> None:
    b = sub.add_parser(
        "bench-cine",
        help="an XA cine at 30 fps through the real node, uncompressed vs JPEG Lossless: p99 decoding adds",
    )
    b.add_argument("--frames", type=int, default=90, help="frames per cine (default 90: 3 s at 30 fps)")
    b.add_argument("--size", type=int, default=1024, help="frame size in pixels, square (default 1024)")
    b.add_argument("--bits", type=int, default=12, help="bits stored, 9-16 (default 12)")
    b.add_argument("--fps", type=float, default=30.0, help="the cine's frame rate (default 30)")
    b.add_argument(
        "--prompts", default=",".join(DEFAULT_PROMPTS), help="comma list (default lungs,heart,spine)"
    )
    b.add_argument("--engine", default="onnxruntime", help="the node's engine (default onnxruntime)")
    b.add_argument("--checkpoint", help="model weights (default: the embedded default model)")
    b.add_argument("--repeats", type=int, default=2, help="runs per syntax, ABBA order (default 2)")
    b.add_argument(
        "--syntaxes",
        default=f"{UNCOMPRESSED},{COMPRESSED}",
        help=f"baseline,compressed (default {UNCOMPRESSED},{COMPRESSED}); known: {','.join(ENCODERS)}",
    )
    b.add_argument(
        "--warmup-frames", type=int, default=10, help="frames of an uncounted first cine (0: none)"
    )
    b.add_argument("--image", help="gray image the cine is made from (default: a shared chest radiograph)")
    b.add_argument("--json", help="write the result here (e.g. out/bench_cine.json)")
    b.set_defaults(func=run_from_args)
