"""Assemble a running node from settings: model bundle, engine(s), source, publisher, control.

Kept apart from node.py so the pipeline stays readable and tests can build a node from a
settings object exactly as ``fluorosam-rt serve`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import zmq

from engines.select import create_engine

from ..bundle import ModelBundle, load_bundle
from ..geometry_stage import GeometryOptions, GeometryStage
from ..linear_tools import LinearTools, default_linear_tools
from ..prompts import Prompt
from ..sources import create_source
from .control import ControlServer
from .node import Node
from .node_config import GeometrySettings, NodeSettings
from .publish import MaskPublisher
from .security import CurveGate, load_keys


def make_geometry_stage(g: GeometrySettings) -> GeometryStage:
    options = GeometryOptions(
        enabled=g.enabled,
        tolerance_px=g.contour_tolerance_px,
        min_instance_px=g.min_instance_px,
        trace_stride=g.trace_stride,
        max_instances=g.max_instances,
        min_elongation=g.min_elongation,
        tracking=g.tracking,
        track_max_missed=g.track_max_missed,
        smoothing=g.smoothing,
        cut_threshold=g.cut_threshold,
        cut_angle_deg=g.cut_angle_deg,
    )
    tools = default_linear_tools() if g.vocabulary is None else LinearTools.load(g.vocabulary)
    return GeometryStage(options, tools)


@dataclass
class NodeApp:
    """A node with everything around it, as ``build_app`` assembles it from settings.

    ``node``: the pipeline. ``control``: its control server (None without a control endpoint).
    ``bundle``: the model it runs. ``gate``: the ZAP authenticator when CURVE is on, ``context``:
    the node's own ZeroMQ context then; both are closed by ``stop``. A context manager: start on
    entry, stop (and return the final accounting from ``stop``) on exit.
    """

    node: Node
    control: ControlServer | None
    bundle: ModelBundle
    gate: CurveGate | None = None  # CURVE on: the ZAP authenticator and the node's own context
    context: zmq.Context | None = None

    def start(self) -> None:
        self.node.start()
        if self.control is not None:
            self.control.start()

    def stop(self) -> dict[str, Any]:
        if self.control is not None:
            self.control.stop()
        final = self.node.stop()
        if self.gate is not None:
            self.gate.stop()
        if self.context is not None:
            self.context.destroy(linger=0)
        return final

    def __enter__(self) -> NodeApp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_app(settings: NodeSettings, bundle: ModelBundle | None = None) -> NodeApp:
    """Everything bound and loaded but not started; raises with a clear message if it cannot be."""
    m = settings.model
    if m.threads:
        torch.set_num_threads(m.threads)
    # The source first: a bad source setting (a missing TLS file, a port in use) is reported at
    # once, before the model loads, and as the only thing the command prints.
    source = create_source(settings.source)
    try:
        bundle = bundle or load_bundle(m.checkpoint, fmt=m.format)
        predictor = bundle.predictor(
            create_engine(m.engine_settings(), bundle.model),
            presence_threshold=m.presence_threshold,
            mask_threshold=m.mask_threshold,
            device=m.device,
        )
    except BaseException:
        source.stop()
        raise
    sec = settings.security
    context, gate, curve = None, None, None
    if sec.curve_secret_key:
        curve = load_keys(sec.curve_secret_key)
        context = zmq.Context()
        gate = CurveGate(context, sec.curve_allowed_clients or "")
    pub = settings.publish
    publisher = MaskPublisher(
        pub.endpoints,
        pub.sndhwm,
        pub.sndbuf,
        context,
        curve,
        geometry_endpoints=pub.geometry_endpoints,
        v1_endpoints=pub.v1_endpoints,
    )
    node = Node(
        predictor,
        source,
        publisher,
        stream=settings.stream,
        downsample=settings.publish.downsample,
        mask_encoding=settings.publish.mask_encoding,
        include_image=settings.publish.include_image,
        max_prompts=settings.max_prompts,
        stats_window=settings.stats_window,
        model_name=bundle.name,
        geometry=make_geometry_stage(settings.geometry),
    )
    try:
        initial = [
            Prompt(text=p) if isinstance(p, str) else Prompt(p.text, tuple(p.points), tuple(p.labels), p.id)
            for p in settings.prompts
        ]
        if initial:
            node.prompts.set(initial)
        control = (
            ControlServer(node, settings.control.endpoint, context, curve, hints=bundle.prompt_hints())
            if settings.control.endpoint
            else None
        )
    except BaseException:
        publisher.close()
        source.stop()
        if gate is not None:
            gate.stop()
        raise
    return NodeApp(node=node, control=control, bundle=bundle, gate=gate, context=context)
