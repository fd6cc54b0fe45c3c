"""The node's settings: YAML validated into typed models, with CLI flags layered on top.

Every model forbids unknown keys, so a typo ("sndwhm") is an error naming the key instead of a
setting silently left at its default in an operating room.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engines.select import ENGINE_CHOICES, EngineSettings


class NodeConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ReplaySettings(_Strict):
    kind: Literal["replay"] = "replay"
    path: str
    fps: float | None = Field(default=None, gt=0, le=1000)  # None: the recording's own rate, else 15
    loop: bool = False


class VideoSettings(_Strict):
    kind: Literal["video"] = "video"
    device: str  # device index ("0"), file path, or RTSP/HTTP URL (FFMPEG; this OpenCV has no GStreamer)
    roi: list[int] | Literal["auto"] | None = None  # [x, y, w, h] or "auto" (circular field of view)
    realtime: bool = True  # pace files at their own fps, as a live device would deliver them
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
    # A device (frame grabber): format, size and rate to ask for; None keeps the device's default.
    pixel_format: Literal["YUYV", "NV12", "MJPG"] | None = None
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)
    fps: float | None = Field(default=None, gt=0, le=1000)

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: Any) -> Any:
        if isinstance(v, list) and (len(v) != 4 or v[2] <= 0 or v[3] <= 0 or min(v[:2]) < 0):
            raise ValueError("roi must be [x, y, width, height] with x, y >= 0 and a positive size")
        return v


class DicomTlsSettings(_Strict):
    """DICOM TLS on the Storage SCP (PEM files). With ca_file, clients need a certificate it signed."""

    cert_file: str  # the SCP's certificate (chain), PEM
    key_file: str  # its private key, PEM, unencrypted (readable by the node's user only)
    ca_file: str | None = None  # set: mutual TLS, a client certificate signed by this CA is required
    min_version: Literal["1.2", "1.3"] = "1.2"


class DicomSettings(_Strict):
    kind: Literal["dicom"] = "dicom"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    ae_title: str = Field(default="FLUOROSAM", min_length=1, max_length=16)
    allowed_calling_aes: list[str] = Field(default_factory=list)  # empty: any calling AE
    max_associations: int = Field(default=4, ge=1, le=64)
    max_pdu_size: int = Field(default=0, ge=0)
    max_frame_pixels: int = Field(default=4096 * 4096, gt=0)
    max_frame_bytes: int = Field(default=64 * 1024 * 1024, gt=0)  # one decoded frame in memory
    multiframe_fps: float = Field(default=15.0, gt=0, le=1000)
    tls: DicomTlsSettings | None = None  # None: plain TCP (a trusted network segment only)
    log_patient_identifiers: bool = False  # True: the receipt log line names PatientID, AccessionNumber
    # A peer silent this long is dropped and its association slot freed: a read or write that
    # stalls (half a PDU, a stalled TLS handshake), no A-ASSOCIATE-RQ after connecting, an idle
    # open association. Plain TCP and TLS alike.
    network_timeout_s: float = Field(default=30.0, gt=0, le=3600)


SourceSettings = Annotated[ReplaySettings | VideoSettings | DicomSettings, Field(discriminator="kind")]


class ModelSettings(_Strict):
    checkpoint: str | None = None  # None: the embedded default model
    format: Literal["auto", "official", "native"] = "auto"
    engine: str = "torch"
    fallback_engines: list[str] = Field(default_factory=list)  # tried in order after repeated failures
    max_consecutive_failures: int = Field(default=5, ge=1)
    device: str = "cpu"
    threads: int = Field(default=0, ge=0)  # torch intra-op threads; 0 leaves torch's default
    presence_threshold: float | None = None  # None: the checkpoint's calibrated value
    mask_threshold: float = 0.0

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ENGINE_CHOICES:
            raise ValueError(f"unknown engine {v!r}; choose from {', '.join(ENGINE_CHOICES)}")
        return v

    @field_validator("fallback_engines")
    @classmethod
    def _known_fallbacks(cls, v: list[str]) -> list[str]:
        for name in v:
            cls._known_engine(name)
        return v

    def engine_settings(self) -> EngineSettings:
        """What engines.select.create_engine needs from these settings."""
        return EngineSettings(
            engine=self.engine,
            fallback_engines=tuple(self.fallback_engines),
            max_consecutive_failures=self.max_consecutive_failures,
            device=self.device,
        )


class PublishSettings(_Strict):
    # protocol version 2, masks and geometry
    endpoints: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:5555"], min_length=1)
    # version 2 without mask planes: geometry only (outlines, instances, tool tips and axes)
    geometry_endpoints: list[str] = Field(default_factory=list)
    # version 1 exactly, for subscribers not yet upgraded (no geometry)
    v1_endpoints: list[str] = Field(default_factory=list)
    sndhwm: int = Field(default=2, ge=1, le=1000)  # messages queued per subscriber before dropping
    sndbuf: int = Field(default=0, ge=0)  # kernel send buffer bytes (0: OS default)
    mask_encoding: Literal["u8", "bits"] = "u8"
    downsample: int = Field(default=1, ge=1, le=64)
    include_image: bool = False  # add a uint8 preview of the frame (viewers, the demo)

    @field_validator("endpoints", "geometry_endpoints", "v1_endpoints")
    @classmethod
    def _eps(cls, v: list[str]) -> list[str]:
        for ep in v:
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"endpoint {ep!r} must start with tcp://, ipc:// or inproc://")
        return v


class GeometrySettings(_Strict):
    """Per prompt outlines, instances, tool tips and axes, and tracked ids (geometry_stage.py)."""

    enabled: bool = True
    contour_tolerance_px: float = Field(default=1.0, ge=0, le=50)  # Douglas-Peucker, source pixels
    min_instance_px: int = Field(default=25, ge=1)  # smaller parts are counted as specks
    # anatomy outlined on every n-th mask pixel (geometry_stage.py says why 4); tools on every pixel
    trace_stride: int = Field(default=4, ge=1, le=16)
    max_instances: int = Field(default=32, ge=1, le=1024)  # per prompt, largest first
    min_elongation: float = Field(default=3.0, ge=1.0)  # length/width below which a tool is a blob
    tracking: bool = True
    track_max_missed: int = Field(default=5, ge=0, le=1000)  # frames a lost instance keeps its id
    # weight of the past in the causal EMA of logits and scores; 0 (default) is off: no lag at all
    smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    cut_threshold: float = Field(default=0.35, gt=0)  # image change that starts a new scene
    cut_angle_deg: float = Field(default=10.0, gt=0)  # positioner angle jump that starts a new scene
    vocabulary: str | None = None  # where linear tools are marked; None: configs/vocabulary.yaml


class ControlSettings(_Strict):
    endpoint: str | None = "tcp://127.0.0.1:5556"  # localhost by default; None disables control


class SecuritySettings(_Strict):
    """ZeroMQ CURVE on the mask stream and control socket (both or neither; see security.py)."""

    curve_secret_key: str | None = None  # the node's NAME.key_secret; None: CURVE off
    curve_allowed_clients: str | None = None  # folder of clients' public NAME.key files

    @model_validator(mode="after")
    def _both(self) -> SecuritySettings:
        if (self.curve_allowed_clients is None) != (self.curve_secret_key is None):
            raise ValueError("curve_secret_key and curve_allowed_clients go together")
        return self


class PromptSettings(_Strict):
    text: str
    id: str = ""
    points: list[tuple[float, float]] = Field(default_factory=list)
    labels: list[int] = Field(default_factory=list)


class NodeSettings(_Strict):
    stream: str = Field(default="carm0", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    source: SourceSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    geometry: GeometrySettings = Field(default_factory=GeometrySettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    prompts: list[PromptSettings | str] = Field(default_factory=list)
    max_prompts: int = Field(default=16, ge=1, le=256)
    stats_window: int = Field(default=1000, ge=10)  # frames kept for latency percentiles


def _format_errors(exc: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid node settings:"]
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = "unknown key (not a setting)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_source_spec(spec: str) -> dict[str, Any]:
    """'dicom://HOST:PORT' | 'video:PATH_OR_INDEX' | 'replay:PATH[@FPS]' -> source settings dict."""
    if spec.startswith("dicom://"):
        hostport = spec[len("dicom://") :]
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit():
            raise NodeConfigError(f"bad source {spec!r}: expected dicom://HOST:PORT")
        return {"kind": "dicom", "host": host or "0.0.0.0", "port": int(port)}
    if spec.startswith("video:"):
        return {"kind": "video", "device": spec[len("video:") :]}
    if spec.startswith("replay:"):
        rest = spec[len("replay:") :]
        path, at, fps = rest.rpartition("@")
        if at and fps.replace(".", "", 1).isdigit():
            return {"kind": "replay", "path": path, "fps": float(fps)}
        return {"kind": "replay", "path": rest}
    raise NodeConfigError(
        f"bad source {spec!r}: use dicom://HOST:PORT, video:PATH_OR_INDEX or replay:PATH[@FPS]"
    )


def load_settings(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> NodeSettings:
    """YAML file (optional) with overrides merged on top (CLI flags win), validated."""
    data: dict[str, Any] = {}
    origin = "flags"
    if path is not None:
        p = Path(path)
        origin = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except FileNotFoundError as exc:
            raise NodeConfigError(f"config file {p} does not exist") from exc
        except yaml.YAMLError as exc:
            raise NodeConfigError(f"{p}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise NodeConfigError(f"{p}: the top level must be a mapping of settings")
        data = loaded
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "source":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if "source" not in data:
        raise NodeConfigError(f"{origin}: no source given (config 'source:' or --source)")
    try:
        return NodeSettings.model_validate(data)
    except ValidationError as exc:
        raise NodeConfigError(_format_errors(exc, origin)) from exc
