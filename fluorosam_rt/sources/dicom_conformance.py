"""The DICOM Conformance Statement (docs/conformance.md), generated from the SCP's real
configuration: its SOP classes, the transfer syntaxes its installed decoders handle, the
node's default DICOM settings, the status codes its handler answers and what each frame
publishes.

Why generated: a hand-written statement drifts from the code the first time someone adds a
decoder or a limit. ``fluorosam-rt conformance --markdown --out docs/conformance.md`` rewrites
it, and tests/test_dicom_conformance.py fails when the file and the code disagree (and checks
the statement's SOP classes and transfer syntaxes against a running SCP).
"""

from __future__ import annotations

from typing import Any

from bridge.protocol import PATIENT_KEYS, STUDY_KEYS

from ..dicom_codecs import SYNTAXES, decodable_syntaxes, decoder_plugins
from ..dicom_functional_groups import _META_MACROS, _PIXEL_MACROS
from .base import GEOMETRY_KEYS
from .dicom_frames import _TIME_KEYS, _UID_KEYS, XRAY_STORAGE_SOP_CLASSES
from .dicom_scp import STATUS_MEANINGS, TLS_VERSIONS, VERIFICATION_SOP_CLASS, DicomStorageSource

# Per-frame keys the decode path adds to the message's "source" map (imageio, dicom_frames,
# dicom_scp, the functional groups); the geometry keys are sources.base.GEOMETRY_KEYS.
_FRAME_KEYS = (
    "source",
    "frame_index",
    "num_frames",
    "calling_ae",
    "TransferSyntaxUID",
    "LossyImageCompression",
    "PhotometricInterpretation",
    "inverted",
    "voi",
    "WindowCenter",
    "WindowWidth",
    "stream_bits",
    "frame_interval_ms",
)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def conformance_markdown() -> str:
    """The statement as Markdown, from the code and the default DicomSettings."""
    import pydicom.charset
    import pynetdicom

    from ..service.node_config import DicomSettings, DicomTlsSettings

    d = DicomSettings()
    scp = DicomStorageSource()  # not started: only its built-in defaults are read
    tls_default = DicomTlsSettings.model_fields["min_version"].default
    accepted = decodable_syntaxes()
    missing = [s for s in SYNTAXES if s not in accepted]
    lines = [
        "# DICOM Conformance Statement: fluorosam-rt Storage SCP",
        "",
        "Generated from the code by `fluorosam-rt conformance --markdown --out docs/conformance.md`;",
        "`tests/test_dicom_conformance.py` fails when this file and the code disagree. Do not edit by hand.",
        "",
        "## 1 Overview",
        "",
        "fluorosam-rt receives X-ray images with DICOM C-STORE (`--source dicom://HOST:PORT` or a node",
        "config with `source.kind: dicom`), segments every frame by text prompts and publishes the masks",
        "over ZeroMQ (`docs/protocol.md`). It is a Storage SCP and a Verification SCP only: it never",
        "initiates associations, stores nothing on disk, and offers no query/retrieve.",
        "",
        "## 2 Network services",
        "",
        "### 2.1 SOP classes (role: SCP)",
        "",
        *_table(
            ("SOP class", "UID"),
            [(name, uid) for uid, name in XRAY_STORAGE_SOP_CLASSES.items()]
            + [("Verification", VERIFICATION_SOP_CLASS)],
        ),
        "",
        "Any other abstract syntax is refused at association time (presentation context result 3,",
        "abstract syntax not supported). No SCP/SCU role selection and no extended negotiation.",
        "",
        "### 2.2 Transfer syntaxes",
        "",
        "Accepted for every storage SOP class above: exactly those an installed decoder handles,",
        "asked from pydicom's decoder plugins when the SCP starts. Decoders are tried in the order",
        "shown; the next one is used if one fails.",
        "",
        *_table(
            ("transfer syntax", "UID", "lossy", "decoders"),
            [
                (s.name, s.uid, "yes" if s.lossy else "no", ", ".join(decoder_plugins(s.uid)))
                for s in accepted
            ],
        ),
        "",
        "Any other transfer syntax (MPEG-2, MPEG-4, HEVC, JPEG XL, JPIP, ..."
        + (", and here " + ", ".join(s.name for s in missing) if missing else "")
        + ") is refused at association time (result 4, transfer syntaxes not supported), so a sender",
        "learns before it sends pixels. Verification accepts the default syntaxes (Implicit and Explicit",
        "VR Little Endian, Explicit VR Big Endian, Deflated).",
        "",
        "### 2.3 Application Entity and association policies",
        "",
        "Defaults; each is a key under `source:` in a node config (`configs/node/dicom_carm.yaml`).",
        "",
        *_table(
            ("setting", "default", "meaning"),
            [
                ("`ae_title`", d.ae_title, "the called AE title the SCP answers to"),
                ("`port`", d.port, "TCP port (`host` default " + d.host + ")"),
                (
                    "`allowed_calling_aes`",
                    "[] (any)",
                    "calling AE titles allowed; others are rejected (A-ASSOCIATE-RJ, reason 3)",
                ),
                ("`max_associations`", d.max_associations, "concurrent associations; more are rejected"),
                ("`max_pdu_size`", f"{d.max_pdu_size} (unlimited)", "maximum PDU size the SCP receives"),
                (
                    "`network_timeout_s`",
                    f"{d.network_timeout_s:g} s",
                    "ACSE timeout, idle association timeout and per-socket read/write timeout",
                ),
                ("`max_frame_pixels`", d.max_frame_pixels, "Rows x Columns of one frame"),
                ("`max_frame_bytes`", d.max_frame_bytes, "one decoded frame in memory"),
                ("max object frames", scp.max_object_frames, "Number of Frames of one object"),
                ("max pending frames", scp._pending.maxsize, "frames queued for the stream, all objects"),
                ("`multiframe_fps`", f"{d.multiframe_fps:g}", "play rate of a cine that records no timing"),
            ],
        ),
        "",
        f"Implementation Class UID {pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}, Implementation Version",
        f"Name {pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION} (pynetdicom). Asynchronous operations are",
        "not negotiated (one operation at a time per association).",
        "",
        "### 2.4 C-STORE status codes",
        "",
        *_table(
            ("status", "meaning", "when"),
            [(f"0x{code:04X}", m[0], m[1]) for code, m in sorted(STATUS_MEANINGS.items())],
        ),
        "",
        "A refused object never stops the SCP: the association continues and the next object is",
        "handled normally. Every refusal is logged at WARNING with its reason and counted by reason",
        "(`status` on the control socket).",
        "",
        "### 2.5 Security",
        "",
        "Optional TLS (PS3.15 B.1 basic TLS secure transport connection profile) with PEM files:",
        f"minimum TLS version {tls_default} by default (choices: {', '.join(sorted(TLS_VERSIONS))}); with",
        "`tls.ca_file` set, clients must present a certificate signed by that CA (mutual TLS). Without",
        "`tls`, plain TCP: use a trusted network segment. Patient identifiers are never logged unless",
        "`log_patient_identifiers` is set.",
        "",
        "## 3 Character sets",
        "",
        "Text attributes are decoded with pydicom according to Specific Character Set (0008,0005);",
        "absent means ISO_IR 6 (ASCII). Supported values:",
        "",
        ", ".join(f"`{c}`" for c in sorted(k for k in pydicom.charset.python_encoding if k)),
        "",
        "Published strings are UTF-8 (msgpack).",
        "",
        "## 4 What is published for each object",
        "",
        "Every frame of an accepted object becomes one message on the mask stream (a multi-frame",
        "object is played at its own frame times: Frame Time Vector, Frame Time, or the enhanced",
        "per-frame acquisition times; else `multiframe_fps`). Each frame is received and either",
        "published or dropped with a reason (`received = published + dropped`).",
        "",
        "Message `geometry` (when the object has them): " + ", ".join(f"`{k}`" for k in GEOMETRY_KEYS) + ".",
        "",
        "Message `source`: "
        + ", ".join(
            f"`{k}`"
            for k in (
                *_FRAME_KEYS,
                *_UID_KEYS,
                "Modality",
                *PATIENT_KEYS,
                *STUDY_KEYS,
                *_TIME_KEYS,
                *(k for keys in _META_MACROS.values() for k in keys if k not in GEOMETRY_KEYS),
            )
        )
        + ".",
        "",
        "Enhanced XA/XRF objects: each frame takes these functional group macros from the Shared",
        "Functional Groups, overridden by its own Per-Frame Functional Groups item:",
        "",
        *_table(
            ("macro (sequence)", "attributes", "used for"),
            [(k, ", ".join(v), "display (applied to the pixels)") for k, v in _PIXEL_MACROS.items()]
            + [(k, ", ".join(v), "published metadata") for k, v in _META_MACROS.items()],
        ),
        "",
        "Display pipeline per frame: Modality LUT or rescale, VOI LUT or window, MONOCHROME1 inversion",
        "(bright = dense). A compressed stream whose values exceed Bits Stored is read at the stream's",
        "precision (`stream_bits` in `source`).",
        "",
    ]
    return "\n".join(lines)
