"""Source settings (typed, from YAML or a CLI spec string) -> a running source object."""

from __future__ import annotations

from typing import Any

from .base import Source


def create_source(settings: Any) -> Source:
    """settings: one of node_config's source settings models."""
    kind = settings.kind
    if kind == "replay":
        from .replay import ReplaySource

        return ReplaySource(settings.path, fps=settings.fps, loop=settings.loop)
    if kind == "video":
        from .video import VideoSource

        roi = tuple(settings.roi) if isinstance(settings.roi, list) else settings.roi
        return VideoSource(
            settings.device,
            roi=roi,
            realtime=settings.realtime,
            reconnect_initial_s=settings.reconnect_initial_s,
            reconnect_max_s=settings.reconnect_max_s,
            pixel_format=settings.pixel_format,
            width=settings.width,
            height=settings.height,
            fps=settings.fps,
        )
    if kind == "dicom":
        from .dicom_scp import DicomStorageSource, server_tls_context

        tls = settings.tls
        ssl_context = (
            server_tls_context(tls.cert_file, tls.key_file, tls.ca_file, tls.min_version) if tls else None
        )
        return DicomStorageSource(
            host=settings.host,
            port=settings.port,
            ae_title=settings.ae_title,
            allowed_calling_aes=settings.allowed_calling_aes,
            max_associations=settings.max_associations,
            max_pdu_size=settings.max_pdu_size,
            max_frame_pixels=settings.max_frame_pixels,
            max_frame_bytes=settings.max_frame_bytes,
            multiframe_fps=settings.multiframe_fps,
            ssl_context=ssl_context,
            log_patient_identifiers=settings.log_patient_identifiers,
            network_timeout_s=settings.network_timeout_s,
        )
    raise ValueError(f"unknown source kind {kind!r}")
