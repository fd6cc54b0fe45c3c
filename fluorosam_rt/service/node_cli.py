"""The node's commands: ``serve``, ``prompts``, ``view`` and ``demo``.

Kept out of cli.py so the node's options live next to each other; cli.py only registers them.
Every command is scriptable (flags, exit codes, files) because operators and tests both drive it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..bundle import ASSETS_DIR

DEMO_CLIP = ASSETS_DIR / "demo" / "chest_sweep.mp4"
DEMO_PROMPTS = ("left lung", "right lung", "heart")


def _usage(msg: str) -> Exception:
    # Not cli.UsageError: under ``python -m fluorosam_rt.cli`` that class lives in __main__.
    from .node_config import NodeConfigError

    return NodeConfigError(msg)


# --------------------------------------------------------------------------- serve


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .node_config import parse_source_spec

    o: dict[str, Any] = {}
    if args.source:
        o["source"] = parse_source_spec(args.source)
    if args.stream:
        o["stream"] = args.stream
    model: dict[str, Any] = {}
    for key in ("checkpoint", "engine", "threads", "device"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    if model:
        o["model"] = model
    pub: dict[str, Any] = {}
    if args.publish:
        pub["endpoints"] = args.publish
    if args.publish_geometry:
        pub["geometry_endpoints"] = args.publish_geometry
    if args.publish_v1:
        pub["v1_endpoints"] = args.publish_v1
    if args.downsample is not None:
        pub["downsample"] = args.downsample
    if args.mask_encoding:
        pub["mask_encoding"] = args.mask_encoding
    if args.include_image:
        pub["include_image"] = True
    if pub:
        o["publish"] = pub
    if args.control:
        o["control"] = {"endpoint": None if args.control == "none" else args.control}
    if args.prompt:
        o["prompts"] = args.prompt
    if args.smoothing is not None:
        o["geometry"] = {"smoothing": args.smoothing}
    return o


def _install_signal_handlers(app: Any) -> None:
    """First SIGTERM/SIGINT: stop cleanly (frames published or counted). Second: exit at once."""
    hits = {"n": 0}

    def handler(signum: int, _frame: Any) -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            os._exit(130)
        app.node.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


def _configure_logging(level: str) -> Any:
    """Root logger -> stderr at ``level``, UTC ISO-8601 timestamps (an OR log is compared with the
    C-arm's and the PACS's, across daylight-saving changes). stdout keeps only the JSON
    ready/stopped lines. Returns an undo function: ``serve`` is also called in-process (tests, an
    embedding program), whose logging must be as it was afterwards.
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)

    def undo() -> None:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()

    return undo


def cmd_serve(args: argparse.Namespace) -> int:
    undo_logging = _configure_logging(args.log_level)
    try:
        return _serve(args)
    finally:
        undo_logging()


def _serve(args: argparse.Namespace) -> int:
    from .node_config import load_settings
    from .serve import build_app

    settings = load_settings(args.config, _serve_overrides(args))
    app = build_app(settings)
    _install_signal_handlers(app)
    app.start()
    metrics = _start_metrics(args.metrics, app, settings.stream) if args.metrics else None
    ready = {
        "event": "ready",
        "stream": settings.stream,
        "publish": app.node.publisher.endpoints,
        "publish_geometry": app.node.publisher.geometry_endpoints,
        "publish_v1": app.node.publisher.v1_endpoints,
        "control": app.control.endpoint if app.control else None,
        "source": app.node.source.describe(),
        "metrics": f"http://{metrics.address[0]}:{metrics.address[1]}/metrics" if metrics else None,
    }
    print(json.dumps(ready), flush=True)
    try:
        app.node.run(until_source_finished=not args.keep_running, timeout=args.max_seconds)
    finally:
        if metrics is not None:
            metrics.stop()
        final = app.stop()
    # The source's own counts, outside the node's books: what it emitted (tests compare it with
    # "received") and the inputs it skipped before they became frames, by reason (a grabber's "late").
    src = app.node.source
    counts = {"source_emitted": src.emitted, "source_rejected": dict(src.rejected)}
    print(json.dumps({"event": "stopped", **final, **counts}), flush=True)
    return 0


def _start_metrics(spec: str, app: Any, stream: str) -> Any:
    """Prometheus text metrics of the node's flow tracking at http://HOST:PORT/metrics."""
    from .flow import MetricsServer, prometheus_text

    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise _usage(f"bad --metrics {spec!r}: expected HOST:PORT (e.g. 127.0.0.1:9108)")
    server = MetricsServer(lambda: prometheus_text(app.node.stats(), stream), host or "127.0.0.1", int(port))
    server.start()
    return server


# --------------------------------------------------------------------------- prompts


def cmd_prompts(args: argparse.Namespace) -> int:
    from .control import send_command

    if args.action == "add":
        req: dict[str, Any] = {"cmd": "add", "prompts": args.items}
    elif args.action == "set":
        req = {"cmd": "set", "prompts": args.items}
    elif args.action == "remove":
        req = {"cmd": "remove", "ids": args.items}
    else:
        req = {"cmd": args.action}
    if args.action in ("add", "remove") and not args.items:
        raise _usage(f"'prompts {args.action}' needs at least one prompt")
    try:
        reply = send_command(args.control, req, timeout=args.timeout)
    except TimeoutError as exc:
        raise _usage(str(exc)) from exc
    if not reply.get("ok"):
        err = reply.get("error", {})
        print(f"fluorosam-rt prompts: error: {err.get('message')} ({err.get('code')})", file=sys.stderr)
        return 1
    from ..prompt_hints import Hint

    for h in reply.get("hints") or []:  # advice on stderr; stdout stays the prompt list
        if h.get("far"):
            near = tuple((p, float(s)) for p, s in h["nearest"])
            hint = Hint(h["text"], True, float(h["similarity"]), near)
            print(f"fluorosam-rt prompts: hint: {hint.message()}", file=sys.stderr)
    if args.json or args.action in ("status", "stats", "flow"):
        print(json.dumps(reply, indent=2))
    else:
        for p in reply.get("prompts", []):
            print(f"{p['id']}\t{p['text']}" + (f"\t{p['points']}" if p["points"] else ""))
    return 0


# --------------------------------------------------------------------------- view


def _save_frame(out: Path, msg: Any, overlay: bool) -> None:
    import cv2
    import numpy as np

    from ..overlay import draw_geometry, render_overlay, slugify

    stem = f"{msg.frame_id:06d}"
    used: set[str] = set()
    for p in msg.prompts:
        name = slugify(p.id)
        while name in used:
            name += "_"
        used.add(name)
        if p.mask is not None:  # a geometry-only stream has no mask planes
            cv2.imwrite(str(out / f"{stem}_{name}.png"), p.mask * np.uint8(255))
    header = {
        "frame_id": msg.frame_id,
        "seq": msg.seq,
        "stream": msg.stream,
        "timestamps_ns": msg.timestamps_ns,
        "source": msg.source,
        "geometry": msg.geometry,
        "source_shape": list(msg.source_shape),
        "mask_shape": list(msg.mask_shape),
        "downsample": msg.downsample,
        "encoding": msg.encoding,
        "version": msg.version,
        "spacing": msg.spacing.to_wire() if msg.spacing is not None else None,
        "scene": msg.scene.to_wire() if msg.scene is not None else None,
        "prompts": [
            {
                "id": p.id,
                "text": p.text,
                "score": p.score,
                "present": p.present,
                **(p.geometry.to_wire() if p.geometry is not None else {}),
            }
            for p in msg.prompts
        ],
    }
    (out / f"{stem}.json").write_text(json.dumps(header, indent=1, default=str))
    if overlay:
        base = msg.image if msg.image is not None else np.zeros(msg.mask_shape, np.uint8)
        geometries = [p.geometry for p in msg.prompts]
        masks = [p.mask if p.mask is not None else np.zeros(msg.mask_shape, np.uint8) for p in msg.prompts]
        # with published geometry, its contours are drawn instead of outlines traced here
        with_geometry = any(g is not None and g.contours for g in geometries)
        img = render_overlay(base, masks, [p.text for p in msg.prompts], outline=not with_geometry)
        draw_geometry(img, geometries, msg.downsample)
        cv2.imwrite(str(out / f"{stem}_overlay.png"), img)


def view_line(msg: Any) -> str:
    """One line per frame: latency, each prompt's area fraction, instances and tool tips."""
    items = []
    h, w = msg.source_shape
    for p in msg.prompts:
        g = p.geometry
        if g is not None and g.area_px is not None:
            frac = g.area_px / (h * w)
        else:
            frac = float(p.mask.mean()) if p.mask is not None else 0.0
        item = f"{p.text}={frac:.3f}{'' if p.present else '(absent)'}"
        if g is not None and g.instances:
            item += f" x{len(g.instances)}"
            item += "".join(f" tip#{i.id}=({i.tip[0]:.1f},{i.tip[1]:.1f})" for i in g.instances if i.tip)
        items.append(item)
    return f"frame {msg.frame_id} latency {msg.latency_ms():.1f} ms " + ", ".join(items)


def cmd_view(args: argparse.Namespace) -> int:
    from bridge import Subscriber

    out = Path(args.save) if args.save else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    n = 0
    with Subscriber(args.connect, topic=args.topic) as sub:
        for msg in sub.messages(args.max_frames or 10**12, timeout=args.timeout, newest=not args.every):
            n += 1
            if out is not None:
                _save_frame(out, msg, args.overlay)
            print(view_line(msg), flush=True)
    if n == 0:
        print(
            f"fluorosam-rt view: no frame arrived from {args.connect} within {args.timeout} s",
            file=sys.stderr,
        )
        return 1
    print(f"received {n} frames (skipped {sub.skipped} older, lost {sub.lost})")
    return 0


# --------------------------------------------------------------------------- demo


def _demo_inputs(args: argparse.Namespace) -> tuple[str | None, Path]:
    from ..bundle import DEFAULT_MODEL_PATH

    if args.checkpoint is None and not DEFAULT_MODEL_PATH.is_file():
        raise _usage(
            "the demo runs on the embedded default model, which is not installed yet "
            f"({DEFAULT_MODEL_PATH}); until it is trained and committed, pass --checkpoint PATH "
            "(any fluorosam-rt or FluoroSAM checkpoint)"
        )
    clip = Path(args.clip) if args.clip else DEMO_CLIP
    if not clip.exists():
        raise _usage(
            f"the demo clip {clip} does not exist; it is rendered by the synthetic data engine from the "
            "bundled CT and committed with the default model. Pass --clip PATH (a video, or a folder of "
            "images or DICOM files) meanwhile"
        )
    return args.checkpoint, clip


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from bridge import Subscriber, SubscriberTimeout

    from .node_config import load_settings
    from .serve import build_app

    checkpoint, clip = _demo_inputs(args)
    workdir = Path(tempfile.mkdtemp(prefix="fluorosam-demo-"))
    endpoint = f"ipc://{workdir}/masks"
    settings = load_settings(
        None,
        {
            "stream": "demo",
            "source": {"kind": "replay", "path": str(clip), "fps": args.fps, "loop": args.loop},
            "model": {"checkpoint": checkpoint, "threads": args.threads, "engine": args.engine},
            "publish": {
                "endpoints": [endpoint, *(args.publish or [])],
                "include_image": True,
                "downsample": args.downsample,
            },
            "control": {"endpoint": args.control},
            "prompts": args.prompt or list(DEMO_PROMPTS),
        },
    )
    app = build_app(settings)
    _install_signal_handlers(app)
    frames: list[Any] = []
    latencies: list[float] = []
    stop_sub = threading.Event()

    def follow(sub: Subscriber) -> None:
        t_last, n_last = time.monotonic(), 0
        while not stop_sub.is_set():
            try:
                msg = sub.receive(timeout=0.2)
            except SubscriberTimeout:
                continue
            latencies.append(msg.latency_ms("source", "published"))
            if len(frames) < args.max_overlay_frames:
                frames.append(msg)
            now = time.monotonic()
            if now - t_last >= 1.0:
                fps = (len(latencies) - n_last) / (now - t_last)
                print(
                    f"  {fps:5.1f} fps   latency {latencies[-1]:6.1f} ms   frame {msg.frame_id}", flush=True
                )
                t_last, n_last = now, len(latencies)

    sub = Subscriber(endpoint, topic="demo")
    follower = threading.Thread(target=follow, args=(sub,), daemon=True)
    follower.start()
    time.sleep(0.2)  # let the subscription reach the publisher before the first frame
    print(
        f"demo: model {app.bundle.name}, engine {app.node.predictor.engine.name}, clip {clip}, "
        f"prompts {[p.text for p in app.node.prompts.snapshot()]}"
    )
    t0 = time.monotonic()
    app.start()
    try:
        app.node.run(until_source_finished=not args.loop)
    finally:
        final = app.stop()
        time.sleep(0.3)
        stop_sub.set()
        follower.join(timeout=5)
        sub.close()
    wall = time.monotonic() - t0
    out = Path(args.out)
    if frames:
        _write_animation(out, frames)
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    summary = {
        "frames_in": final["received"],
        "published": final["published"],
        "dropped": final["dropped"],
        "fps": round(final["published"] / wall, 2) if wall > 0 else 0.0,
        "latency_ms_p50": round(float(np.nanpercentile(lat, 50)), 1) if latencies else None,
        "latency_ms_p99": round(float(np.nanpercentile(lat, 99)), 1) if latencies else None,
        "subscriber_received": len(latencies),
        "overlay": str(out) if frames else None,
    }
    print("demo summary: " + json.dumps(summary))
    return 0


def _write_animation(out: Path, msgs: list[Any]) -> None:
    """Overlay GIF (or a video for .mp4/.avi) of what the subscriber saw."""
    import cv2
    from PIL import Image

    from ..overlay import render_overlay

    images = [
        render_overlay(m.image, [p.mask for p in m.prompts], [f"{p.text} {p.score:.2f}" for p in m.prompts])
        for m in msgs
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in (".mp4", ".avi"):
        h, w = images[0].shape[:2]
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if out.suffix.lower() == ".mp4" else "MJPG"))
        vw = cv2.VideoWriter(str(out), fourcc, 10.0, (w, h))
        for img in images:
            vw.write(img)
        vw.release()
        return
    pil = [Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)) for img in images]
    pil[0].save(out, save_all=True, append_images=pil[1:], duration=100, loop=0)


# --------------------------------------------------------------------------- keys


def cmd_keys(args: argparse.Namespace) -> int:
    """The node's key pair goes in security.curve_secret_key; each client's NAME.key in the
    folder named by security.curve_allowed_clients. The node's NAME.key goes to every client."""
    from .security import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    print(json.dumps({"public": str(public), "secret": str(secret)}))
    return 0


# --------------------------------------------------------------------------- registration


def add_node_commands(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the streaming node (source -> masks on ZeroMQ)")
    serve.add_argument("--config", help="node settings YAML (configs/node/*.yaml); flags override it")
    serve.add_argument("--source", help="dicom://HOST:PORT | video:PATH_OR_INDEX | replay:PATH[@FPS]")
    serve.add_argument("--publish", action="append", help="PUB endpoint, tcp:// or ipc:// (repeatable)")
    serve.add_argument(
        "--publish-geometry", action="append", help="PUB endpoint for geometry-only messages (repeatable)"
    )
    serve.add_argument(
        "--publish-v1", action="append", help="PUB endpoint speaking protocol version 1 (repeatable)"
    )
    serve.add_argument(
        "--smoothing", type=float, help="temporal smoothing weight of the past, 0 (off, default) to <1"
    )
    serve.add_argument("--control", help="control endpoint (REP), or 'none'")
    serve.add_argument("--prompt", action="append", help="initial prompt (repeatable)")
    serve.add_argument("--stream", help="stream name (the message topic)")
    serve.add_argument("--checkpoint", help="model weights (default: the embedded model)")
    serve.add_argument("--engine", help="inference back end (default: torch)")
    serve.add_argument("--device", help="torch device (default: cpu)")
    serve.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    serve.add_argument("--downsample", type=int, help="publish masks at 1/N of the source resolution")
    serve.add_argument("--mask-encoding", choices=["u8", "bits"])
    serve.add_argument("--include-image", action="store_true", help="publish a uint8 preview of each frame")
    serve.add_argument("--keep-running", action="store_true", help="do not exit when a replay/file ends")
    serve.add_argument("--max-seconds", type=float, help="stop after this long (tests, soak runs)")
    serve.add_argument("--metrics", help="serve Prometheus text metrics at http://HOST:PORT/metrics")
    serve.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="log to stderr with UTC timestamps (default INFO: an unattended OR node's log is "
        "what a service engineer reads after an incident: each DICOM association and object "
        "received, engine selection and switches, errors; a few lines per object, none "
        "per frame, no patient identifiers. DEBUG adds the per-object DICOM receipt line (with "
        "PatientID/AccessionNumber only if log_patient_identifiers is set) and pynetdicom's PDU "
        "dumps, hundreds of lines per association: for diagnosis)",
    )
    serve.set_defaults(func=cmd_serve)

    pr = sub.add_parser("prompts", help="change or list a running node's prompts")
    pr.add_argument("action", choices=["add", "remove", "set", "list", "status", "stats", "flow"])
    pr.add_argument("items", nargs="*", help="prompt texts (add/set) or ids (remove)")
    pr.add_argument("--control", default="tcp://127.0.0.1:5556", help="the node's control endpoint")
    pr.add_argument("--timeout", type=float, default=10.0)
    pr.add_argument("--json", action="store_true", help="print the full JSON reply")
    pr.set_defaults(func=cmd_prompts)

    view = sub.add_parser("view", help="subscribe to a mask stream; print and optionally save frames")
    view.add_argument("--connect", default="tcp://127.0.0.1:5555")
    view.add_argument("--topic", default="", help="stream name to follow (default: all)")
    view.add_argument("--max-frames", type=int, default=0, help="exit 0 after N frames (0: run until idle)")
    view.add_argument("--timeout", type=float, default=10.0, help="exit when no frame arrives this long")
    view.add_argument("--save", help="folder for masks (PNG) and headers (JSON)")
    view.add_argument("--overlay", action="store_true", help="also write an overlay PNG per frame")
    view.add_argument("--every", action="store_true", help="take frames in order instead of the newest")
    view.set_defaults(func=cmd_view)

    keys = sub.add_parser("keys", help="ZeroMQ CURVE key files for the mask stream and control socket")
    keys.add_argument("action", choices=["generate"])
    keys.add_argument("--dir", required=True, help="folder for NAME.key (public) and NAME.key_secret")
    keys.add_argument("--name", default="node", help="key name (node, or one per client)")
    keys.set_defaults(func=cmd_keys)

    from ..bench.cli import add_bench_parser

    add_bench_parser(sub)

    demo = sub.add_parser("demo", help="the embedded model on a replayed C-arm sweep, with live fps/latency")
    demo.add_argument("--checkpoint", help="weights (default: the embedded model)")
    demo.add_argument("--clip", help=f"recording to replay (default: {DEMO_CLIP.name})")
    demo.add_argument(
        "--prompt", action="append", help=f"prompt (repeatable; default: {', '.join(DEMO_PROMPTS)})"
    )
    demo.add_argument("--fps", type=float, default=15.0)
    demo.add_argument("--loop", action="store_true", help="keep replaying until Ctrl-C")
    demo.add_argument("--downsample", type=int, default=1)
    demo.add_argument("--threads", type=int, default=0)
    demo.add_argument(
        "--engine",
        default="auto",
        help="auto, trt, torch-compiled, onnxruntime or torch (default auto: the fastest that loads, "
        "ONNX Runtime on a CPU-only machine)",
    )
    demo.add_argument("--control", default=None, help="also serve the control socket here")
    demo.add_argument("--publish", action="append", help="also publish the mask stream here (the web viewer)")
    demo.add_argument("--out", default="fluorosam-demo.gif", help="overlay animation (.gif, .mp4, .avi)")
    demo.add_argument("--max-overlay-frames", type=int, default=150)
    demo.set_defaults(func=cmd_demo)
