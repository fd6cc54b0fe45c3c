"""DICOM Storage SCP: a C-arm or PACS pushes images with C-STORE and each frame joins the stream.

Why these choices:

* Only X-ray storage SOP classes are negotiated, so a CT or MR sender learns at association
  time that we will not take its objects, instead of after sending gigabytes.
* Failures answer with the standard's C-STORE status (PS3.4 B.2.3): 0xC000 "cannot understand"
  for data we cannot decode, 0xA900 when the data set does not match its SOP class, 0xA700 "out
  of resources" for frames over the configured size limits (pixels per frame, bytes per decoded
  frame, frames per object) or when the frame queue is full.
  The sender can then retry or alert; the node keeps running.
* The SCP accepts exactly the transfer syntaxes it can decode, asked from pydicom's installed
  decoders when it starts (``dicom_codecs.decodable_syntaxes``), for every storage SOP class:
  a sender proposing anything else (MPEG video, a JPEG whose decoder is missing) has that
  presentation context refused at association time, before it sends a byte of pixels.
* A multi-frame cine arrives in one object. Its frames are played into the stream at their own
  times (Frame Time Vector, Frame Time, or an enhanced object's per-frame acquisition times;
  else ``multiframe_fps``) by one pacing thread, because latest-frame-wins would otherwise keep
  only the last frame of every object. Every frame is decoded and checked before the answer,
  so a Success status means every frame entered the queue.
* A frame's source time is its object's C-STORE arrival (plus k frame intervals for frame k of
  a cine), not the pacer's emit time: decode and queueing here show in the node's latency.
* Every refusal is logged at WARNING with its reason (never with patient identifiers) and
  counted by reason in ``rejected``.
* Optional TLS (DICOM PS3.15 B.1, the "basic TLS secure transport" profile) through pynetdicom's
  ``ssl_context``: TLS 1.2 at least, and with a CA file only clients holding a certificate that
  CA signed get an association (mutual TLS). Key files that cannot be used stop the start-up
  with one line naming the file; a client that cannot complete the handshake is dropped and the
  server keeps serving.
* Patient identifiers are never logged unless ``log_patient_identifiers`` is set; the receipt
  line (DEBUG) then names PatientID and AccessionNumber so a site can trace an object.
* A peer that goes quiet holds an association slot (``max_associations``), so one setting,
  ``network_timeout_s``, bounds every wait on the peer: each socket read or write of a
  connection (set when it opens, TLS or not, so also a stalled handshake or half a PDU),
  the wait for the A-ASSOCIATE-RQ (pynetdicom's ACSE timeout) and an idle open association
  (its network timeout). pynetdicom alone cannot do the first: its reader waits for the rest of
  a PDU on a blocking socket, and then neither of its timeouts can end the association.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..imageio import ImageReadError
from .base import Source, SourceError
from .dicom_frames import XRAY_STORAGE_SOP_CLASSES, dataset_frames

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
# Every status the C-STORE handler answers, and when (the conformance statement lists these).
STATUS_MEANINGS = {
    STATUS_SUCCESS: ("Success", "every frame of the object was decoded and queued for the stream"),
    STATUS_SOP_CLASS_NOT_SUPPORTED: (
        "Refused: SOP Class not supported",
        "the request's Affected SOP Class is not an X-ray storage class",
    ),
    STATUS_OUT_OF_RESOURCES: (
        "Refused: Out of Resources",
        "a frame is over max_frame_pixels or max_frame_bytes, the object over max_object_frames, "
        "or the frame queue (max_pending_frames) cannot take all its frames",
    ),
    STATUS_DATASET_MISMATCH: (
        "Error: Data Set does not match SOP Class",
        "the data set's SOP Class UID differs from the request's",
    ),
    STATUS_CANNOT_UNDERSTAND: (
        "Error: Cannot understand",
        "the data set cannot be parsed; Image Pixel attributes contradict each other; the frame "
        "count disagrees with the pixel data; a compressed frame is truncated, corrupt or of "
        "another size; or the decoder fails. Error Comment and the WARNING log line give the reason",
    ),
}
TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
DEFAULT_NETWORK_TIMEOUT_S = 30.0  # a peer silent this long (mid-PDU, before its request, idle) is dropped


class _ServerTlsContext(ssl.SSLContext):
    """pynetdicom wraps each accepted socket on its one accepting thread with the default
    ``do_handshake_on_connect=True``: a client that connects and says nothing (a port scanner, a
    half-open link) would stall every later association until it hung up. Here the handshake is
    deferred to the association's own thread (OpenSSL runs it on the first read). The socket
    timeout that drops a peer stopping halfway through a record is the source's
    ``network_timeout_s``, set on every connection as it opens (``_on_connection_open``), TLS or
    not; the bad client holds one association slot for about that long.
    """

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True, **kw: Any
    ) -> ssl.SSLSocket:
        if server_side:
            do_handshake_on_connect = False
        return super().wrap_socket(
            sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect, **kw
        )


def server_tls_context(
    cert_file: str | Path, key_file: str | Path, ca_file: str | Path | None = None, min_version: str = "1.2"
) -> ssl.SSLContext:
    """The SCP's TLS context: our certificate chain and key (PEM), TLS >= ``min_version``, and with
    ``ca_file`` (PEM) a client certificate signed by that CA is required. Raises SourceError with
    one line naming the file that cannot be used.
    """
    if min_version not in TLS_VERSIONS:
        raise SourceError(
            f"DICOM TLS: min_version must be one of {sorted(TLS_VERSIONS)}, not {min_version!r}"
        )
    for what, path in (("certificate", cert_file), ("private key", key_file), ("CA", ca_file)):
        if path is not None and not Path(path).is_file():
            raise SourceError(f"DICOM TLS: {what} file {str(path)!r} does not exist")
    ctx = _ServerTlsContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[min_version]
    try:
        # An encrypted key would otherwise make OpenSSL prompt on the terminal; refuse it instead.
        ctx.load_cert_chain(str(cert_file), str(key_file), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise SourceError(
            f"DICOM TLS: cannot use certificate {str(cert_file)!r} with key {str(key_file)!r} "
            f"(PEM certificate and its unencrypted private key expected): {_ssl_reason(exc)}"
        ) from exc
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise SourceError(
                f"DICOM TLS: cannot use CA file {str(ca_file)!r} (PEM certificates expected): "
                f"{_ssl_reason(exc)}"
            ) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def accepted_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes the SCP accepts: those an installed decoder handles, asked now."""
    from ..dicom_codecs import decodable_syntaxes

    return [s.uid for s in decodable_syntaxes()]


def _comment(reason: str) -> str:
    """The 0xC000 answer's Error Comment (64 characters at most, PS3.7 C.4.2.1.4)."""
    return reason.replace("\\", "/")[:64]


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).replace("\n", " ")


class DicomStorageSource(Source):
    """A DICOM Storage SCP: X-ray objects sent by C-STORE become frames.

    ``host``/``port``/``ae_title``: where and as whom it listens. ``allowed_calling_aes``: the
    AE allow-list (empty: anyone). ``max_associations``: concurrent senders. ``max_pdu_size``: the
    largest PDU it accepts (0: unlimited). ``max_frame_pixels``/``max_frame_bytes``/
    ``max_object_frames``: input limits; larger objects are refused with a status code.
    ``max_pending_frames``: frames of multi-frame objects waiting for the pacer. ``multiframe_fps``:
    the rate a multi-frame object is replayed at when it carries no frame time.
    ``ssl_context``: TLS (from ``server_tls_context()``; None: plain TCP).
    ``log_patient_identifiers``: name PatientID/AccessionNumber in the receipt log line.
    ``network_timeout_s``: how long a stalled peer may hold an association.
    """

    kind = "dicom"

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 11112,
        ae_title: str = "FLUOROSAM",
        allowed_calling_aes: list[str] | None = None,
        max_associations: int = 4,
        max_pdu_size: int = 0,  # 0: unlimited, as pynetdicom
        max_frame_pixels: int = 4096 * 4096,
        max_frame_bytes: int = 64 * 1024 * 1024,
        max_object_frames: int = 2000,
        max_pending_frames: int = 4000,
        multiframe_fps: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,  # from server_tls_context(); None: plain TCP
        log_patient_identifiers: bool = False,
        network_timeout_s: float = DEFAULT_NETWORK_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.host, self.port = host, int(port)
        self.ae_title = ae_title
        self.allowed_calling_aes = list(allowed_calling_aes or [])
        self.max_associations = max_associations
        self.max_pdu_size = max_pdu_size
        self.max_frame_pixels = max_frame_pixels
        self.max_frame_bytes = max_frame_bytes
        self.max_object_frames = max_object_frames
        self.multiframe_fps = multiframe_fps
        self.ssl_context = ssl_context
        self.log_patient_identifiers = log_patient_identifiers
        if not network_timeout_s > 0:
            raise SourceError(f"DICOM network_timeout_s must be > 0, not {network_timeout_s!r}")
        self.network_timeout_s = float(network_timeout_s)
        self.objects_received = 0
        self.status_counts: dict[int, int] = {}
        self.transfer_syntaxes: list[str] = []  # accepted; set when the server starts
        # (pixels, meta, pause after it, source time: C-STORE arrival + the frame's place in a cine)
        self._pending: queue.Queue[tuple[np.ndarray, dict[str, Any], float, int]]
        self._pending = queue.Queue(max_pending_frames)
        self._server: Any = None
        self._pacer: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._server is None:
            return self.host, self.port
        return self._server.server_address[:2]

    def _start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        self.transfer_syntaxes = accepted_transfer_syntaxes()
        for uid in XRAY_STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, self.transfer_syntaxes)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_size
        # The wait for the A-ASSOCIATE-RQ (and the DUL's ARTIM timer), and how long an open
        # association may stay idle between PDUs; the socket timeout is set per connection.
        ae.acse_timeout = ae.network_timeout = self.network_timeout_s
        if self.allowed_calling_aes:
            ae.require_calling_aet = self.allowed_calling_aes
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
        ]
        try:
            self._server = ae.start_server(
                (self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.ssl_context
            )
        except OSError as exc:
            raise SourceError(f"cannot listen for DICOM on {self.host}:{self.port}: {exc}") from exc
        self._pacer = threading.Thread(target=self._pace, name="source-dicom-pacer", daemon=True)
        self._pacer.start()

    def _on_connection_open(self, event: Any) -> None:
        """Give the accepted socket a timeout before its association thread reads from it.

        pynetdicom accepts with a blocking socket (its ``network_timeout`` goes on the listening
        socket only) and, once a PDU has begun, reads until the whole PDU is in: half a header
        or half a P-DATA-TF, then silence, would block its reader for as long as the peer keeps
        the connection open, and an association whose reader is blocked never ends, so it keeps
        its slot. With a timeout the read fails, the DUL sees the transport close, and the
        association ends and frees its slot. Runs on the connection's handler thread, before
        the association starts (so before a TLS handshake, which is deferred to the first read).
        """
        sock = event.assoc.dul.socket.socket  # (pynetdicom logs a handler's exception at ERROR)
        if sock is not None:
            sock.settimeout(self.network_timeout_s)

    def _answer(self, status: int, comment: str = "", reason: str = "") -> Any:
        with self._lock:
            self.status_counts[status] = self.status_counts.get(status, 0) + 1
        if status == STATUS_SUCCESS:
            return status
        log.warning("C-STORE refused with status 0x%04X: %s", status, reason or comment)
        from pydicom import Dataset

        ds = Dataset()
        ds.Status = status
        if comment:
            ds.ErrorComment = comment[:64]
        return ds

    def _on_store(self, event: Any) -> Any:
        """C-STORE handler: decode, enqueue, answer. Never raises (pynetdicom would abort)."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:
            reason = f"undecodable data set: {type(exc).__name__}"
            self.reject("cannot_understand", reason)
            return self._answer(STATUS_CANNOT_UNDERSTAND, "data set cannot be parsed", reason)
        answer = self._store(event, ds)
        status = answer if isinstance(answer, int) else int(answer.Status)
        log.debug("C-STORE from %s: status 0x%04X%s", calling, status, self._identifiers(ds))
        return answer

    def _identifiers(self, ds: Any) -> str:
        """' PatientID=... AccessionNumber=...' when the site allows it in logs, else ''."""
        if not self.log_patient_identifiers:
            return ""
        try:
            return f" PatientID={ds.get('PatientID', '')!s} AccessionNumber={ds.get('AccessionNumber', '')!s}"
        except Exception:  # a malformed element must not turn a log line into an abort
            return " (patient identifiers unreadable)"

    def _store(self, event: Any, ds: Any) -> Any:
        arrived_ns = time.time_ns()  # the frames' source time: decode and queueing then show in latency
        requested = str(event.request.AffectedSOPClassUID)
        if requested not in XRAY_STORAGE_SOP_CLASSES:
            self.reject("sop_class_not_supported")
            return self._answer(STATUS_SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
        if str(ds.get("SOPClassUID", "")) != requested:
            self.reject("dataset_mismatch")
            return self._answer(STATUS_DATASET_MISMATCH, "SOPClassUID differs from the request")
        try:
            rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            # What one decoded frame takes in memory: an RGB 16-bit 4096^2 frame passes the pixel
            # limit but is 96 MB, and a wrong BitsAllocated must not make us allocate gigabytes.
            spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
            frame_bytes = rows * cols * max(spp, 1) * max(-(-bits // 8), 1)
        except (TypeError, ValueError):
            self.reject("cannot_understand", "bad Rows/Columns/NumberOfFrames")
            return self._answer(STATUS_CANNOT_UNDERSTAND, "bad Rows/Columns/NumberOfFrames")
        reason = f"{n_frames} frames of {rows}x{cols} exceed the configured limits"
        if (
            rows * cols > self.max_frame_pixels
            or frame_bytes > self.max_frame_bytes
            or n_frames > self.max_object_frames
        ):
            self.reject("too_large", reason)
            return self._answer(STATUS_OUT_OF_RESOURCES, "frame size or count over the node's limit", reason)
        try:
            frames = dataset_frames(ds)
        except (ImageReadError, ValueError, TypeError, AttributeError, KeyError) as exc:
            reason = str(exc).replace("cannot read image '<dataset>': ", "")[:300]
            self.reject("cannot_understand", reason)
            return self._answer(STATUS_CANNOT_UNDERSTAND, _comment(reason), reason)
        with self._lock:
            if self._pending.maxsize - self._pending.qsize() < len(frames):
                self.reject("queue_full")
                return self._answer(STATUS_OUT_OF_RESOURCES, "frame queue is full")
            offset = 0.0  # a multi-frame object's frame k "arrives" k frame intervals after it
            calling_ae = str(event.assoc.requestor.ae_title).strip()
            for pixels, fields in frames:
                interval = 0.0
                if len(frames) > 1:
                    ms = fields.get("frame_interval_ms")
                    interval = ms / 1000.0 if ms else 1.0 / self.multiframe_fps
                meta = self.frame_meta(fields, calling_ae=calling_ae)
                self._pending.put_nowait((pixels, meta, interval, arrived_ns + round(offset * 1e9)))
                offset += interval
            self.objects_received += 1
        return self._answer(STATUS_SUCCESS)

    def _pace(self) -> None:
        while not self._stop.is_set():
            try:
                pixels, meta, interval, source_ts_ns = self._pending.get(timeout=0.1)
            except queue.Empty:
                continue
            t0 = time.monotonic()
            self.emit(pixels, meta, source_ts_ns)
            if interval > 0 and self._stop.wait(max(0.0, interval - (time.monotonic() - t0))):
                return

    @property
    def idle(self) -> bool:
        """No frames waiting to be played into the stream (tests wait on it)."""
        return self._pending.empty()

    def _stop_impl(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._pacer is not None:
            self._pacer.join(timeout=5)
        # Frames still queued never entered the stream; they are the source's, not the node's.
        while not self._pending.empty():
            self._pending.get_nowait()
            self.reject("shutdown")

    def describe(self) -> dict[str, Any]:
        host, port = self.address
        return {
            **super().describe(),
            "ae_title": self.ae_title,
            "address": f"{host}:{port}",
            "objects_received": self.objects_received,
            "pending_frames": self._pending.qsize(),
            "status_counts": {f"0x{k:04X}": v for k, v in sorted(self.status_counts.items())},
        }
