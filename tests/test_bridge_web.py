"""The web viewer (bridge/web.py): its packets, its protection and latest-frame-wins against a
synthetic publisher, then a real node watched by Debian's headless chromium through selenium.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` (scripts/test.sh installs
them); without them they fail, they do not skip. One node, one viewer and one browser serve the
whole browser part of the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import zmq
from PIL import Image

from bridge import Subscriber, SubscriberTimeout
from bridge.cli import main as bridge_main
from bridge.protocol import MaskMessage, PromptResult, encode_message
from bridge.web import CREDIT, Viewer, WebConfigError, WebOptions, check_options, page_command, serve
from bridge.web_packet import (
    RollingStats,
    build_frame_packet,
    decode_plane,
    encode_plane,
    parse_frame_packet,
    stage_times_ms,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node, wait_for

REPO = Path(__file__).resolve().parents[1]
DEMO_CLIP = REPO / "fluorosam_rt" / "assets" / "demo" / "chest_sweep.mp4"
TOKEN = "s3cret-token-for-tests-0123"


# --------------------------------------------------------------------------- helpers


def message(frame_id: int, shape=(48, 64), prompts=("left lung", "heart"), image=True, source=None):
    rng = np.random.default_rng(frame_id)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    results = []
    for i, text in enumerate(prompts):  # a disc that moves with the frame id: a blob, not noise
        cx, cy = (frame_id * 3 + 20 * i) % w, h // 2
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < 100).astype(np.uint8)
        results.append(PromptResult(text, text, 0.5 + 0.1 * i, i == 0, mask))
    now = time.time_ns()
    t = {"received": now - 30_000_000, "dequeued": now - 25_000_000, "published": now}
    return MaskMessage(
        stream="carm0",
        frame_id=frame_id,
        seq=frame_id,
        timestamps_ns=t,
        source=source or {"source": "replay", "frame_index": frame_id},
        geometry={},
        source_shape=shape,
        downsample=1,
        encoding="bits",
        prompts=results,
        image=rng.integers(0, 255, shape, dtype=np.uint8) if image else None,
    )


class FakePublisher:
    """A PUB socket sending synthetic messages with increasing frame ids from a thread."""

    def __init__(self, endpoint: str, rate_hz: float = 50.0, curve: tuple[bytes, Path] | None = None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.PUB)
        if curve is not None:  # (our secret key, the folder of allowed client public keys)
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(curve[1]))
            self.sock.curve_secretkey = curve[0]
            self.sock.curve_server = True
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.rate_hz = rate_hz
        self.frame_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.frame_id += 1
            self.sock.send_multipart(encode_message(message(self.frame_id)), copy=False)
            time.sleep(1.0 / self.rate_hz)

    def __enter__(self) -> FakePublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


@contextlib.contextmanager
def running_viewer(opts: WebOptions) -> Iterator[Viewer]:
    """The viewer on its own event loop in a thread, as the CLI runs it; stopped on exit."""
    got: list[Viewer] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    stop_box: list[asyncio.Event] = []
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def main() -> None:
            stop_box.append(asyncio.Event())
            await serve(opts, ready=lambda v: (got.append(v), ready.set()), stop=stop_box[0])

        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            errors.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "the viewer did not start"
    if errors:
        raise errors[0]
    try:
        yield got[0]
    finally:
        loop.call_soon_threadsafe(stop_box[0].set)
        thread.join(15)
        assert not thread.is_alive(), "the viewer did not stop"


def http(url: str, headers: dict | None = None, context=None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    handlers = [NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --------------------------------------------------------------------------- packets


@pytest.mark.parametrize("kind", ["empty", "full", "one", "blob", "noise", "odd"])
def test_planes_round_trip_and_pick_the_smaller_form(kind):
    rng = np.random.default_rng(1)
    shape = (37, 53) if kind == "odd" else (64, 96)
    m = np.zeros(shape, np.uint8)
    if kind == "full":
        m[:] = 1
    elif kind == "one":
        m[5, 7] = 1
    elif kind in ("blob", "odd"):
        m[10:30, 20:45] = 1
    elif kind == "noise":
        m = (rng.random(shape) < 0.5).astype(np.uint8)
    enc, data = encode_plane(m)
    np.testing.assert_array_equal(decode_plane(enc, data, shape), m)
    bits = np.packbits(m.astype(bool), axis=None).tobytes()
    assert len(data) <= len(bits)
    assert enc == ("bits" if kind == "noise" else "rle")
    if enc == "bits":  # the wire protocol's bit order: most significant bit first
        assert data == bits


def test_frame_packet_carries_image_masks_legend_and_stages():
    msg = message(7)
    arrived = msg.timestamps_ns["published"] + 2_000_000
    header, body = parse_frame_packet(build_frame_packet(msg, arrived))
    assert (header["frame_id"], header["seq"], header["width"], header["height"]) == (7, 7, 64, 48)
    assert [(p["id"], p["present"]) for p in header["prompts"]] == [("left lung", True), ("heart", False)]
    assert header["prompts"][1]["score"] == pytest.approx(0.6)
    for p, want in zip(header["prompts"], msg.prompts):
        loc = p["mask"]
        got = decode_plane(loc["encoding"], body[loc["offset"] : loc["offset"] + loc["length"]], (48, 64))
        np.testing.assert_array_equal(got, want.mask)
    img = header["image"]
    jpeg = Image.open(io.BytesIO(body[img["offset"] : img["offset"] + img["length"]]))
    assert jpeg.format == "JPEG"
    assert jpeg.size == (64, 48)
    assert np.abs(np.asarray(jpeg, np.float64) - msg.image).mean() < 40  # lossy, but that image
    assert header["stages_ms"] == {"queue": pytest.approx(5.0), "publish_wait": pytest.approx(25.0)} | {
        "transport": pytest.approx(2.0)
    }
    assert header["latency_ms"] == pytest.approx(30.0)


def test_stage_times_fold_a_skipped_stage_into_the_next():
    t = {"source": 0, "received": 1_000_000, "preprocessed": 4_000_000, "published": 10_000_000}
    assert stage_times_ms(t) == {"ingest": 1.0, "preprocess": 3.0, "publish_wait": 6.0}


def test_patient_identifiers_are_not_sent_unless_asked():
    src = {
        "source": "dicom",
        "frame_index": 0,
        "Modality": "XA",
        "PatientName": "Doe^Jane",
        "PatientID": "P1",
    }
    src |= {"AccessionNumber": "A9", "StudyDate": "20240101"}
    msg = message(1, source=src)
    hidden, _ = parse_frame_packet(build_frame_packet(msg, time.time_ns()))
    assert hidden["source"] == {"source": "dicom", "frame_index": 0, "Modality": "XA"}
    blob = json.dumps(hidden)
    assert "Doe" not in blob
    assert "P1" not in blob
    assert "A9" not in blob
    shown, _ = parse_frame_packet(build_frame_packet(msg, time.time_ns(), show_patient=True))
    assert shown["source"]["PatientName"] == "Doe^Jane"
    assert shown["source"]["AccessionNumber"] == "A9"


def test_geometry_only_message_has_no_planes_and_passes_geometry_through():
    msg = message(3, image=False)

    class Geometry:  # what a protocol-v2 PromptResult.geometry gives: its header form
        def to_wire(self):
            return {
                "contours": [[np.array([[1, 1], [9, 1], [9, 9]])]],
                "instances": [{"id": 4, "tip": [9.0, 9.0]}],
            }

    for p in msg.prompts:
        p.mask = None
        p.geometry = Geometry()
    header, body = parse_frame_packet(build_frame_packet(msg, time.time_ns()))
    assert header["image"] is None
    assert body == b""
    assert "mask" not in header["prompts"][0]
    assert header["prompts"][0]["contours"] == [[[[1, 1], [9, 1], [9, 9]]]]
    assert header["prompts"][0]["instances"][0]["tip"] == [9.0, 9.0]


def test_rolling_fps_counts_the_publishers_messages_not_the_ones_taken():
    r = RollingStats(horizon_s=5.0)
    for k in range(11):  # the viewer took every 3rd message of a 30 fps stream
        msg = message(3 * k)
        r.add(msg, msg.timestamps_ns["published"], arrived_mono=100.0 + k * 0.1)
    s = r.summary(now_mono=101.0)
    assert s["fps"] == pytest.approx(30.0)
    assert s["latency_p50_ms"] == pytest.approx(30.0)
    assert len(s["sparkline_ms"]) == 11


# --------------------------------------------------------------------------- protection


def test_unsafe_settings_are_refused():
    with pytest.raises(WebConfigError, match="--token"):
        check_options(WebOptions(connect=["tcp://x:1"], host="0.0.0.0"))
    with pytest.raises(WebConfigError, match="16 characters"):
        check_options(WebOptions(connect=["tcp://x:1"], host="0.0.0.0", token="short"))
    with pytest.raises(WebConfigError, match="both"):
        check_options(WebOptions(connect=["tcp://x:1"], certfile="c.pem"))
    check_options(WebOptions(connect=["tcp://x:1"], host="0.0.0.0", token=TOKEN))
    check_options(WebOptions(connect=["tcp://x:1"], host="::1"))


def test_cli_refuses_a_public_bind_without_token(capsys):
    assert bridge_main(["web", "--connect", "tcp://127.0.0.1:1", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--token" in err


def test_page_may_not_send_operator_commands():
    for cmd in ("shutdown", "flow", "status", None):
        rid, req, reply = page_command({"type": "command", "id": 3, "request": {"cmd": cmd}})
        assert rid == 3
        assert req is None
        assert reply["error"]["code"] == "not_allowed"
    assert page_command({"id": 1, "request": {"cmd": "add", "prompts": ["x"]}})[1] == {
        "cmd": "add",
        "prompts": ["x"],
    }


def test_loopback_viewer_refuses_other_host_names_and_foreign_origins(tmp_path):
    with running_viewer(WebOptions(connect=[f"ipc://{tmp_path}/none"], port=0)) as v:
        base = f"http://127.0.0.1:{v.port}"
        status, headers, body = http(base + "/")
        assert status == 200
        assert b'<canvas id="view"' in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert http(base + "/viewer.js")[0] == 200
        assert http(base + "/", {"Host": "evil.example:80"})[0] == 421  # DNS rebinding
        assert http(base + "/../web.py")[0] == 404

        async def ws(origin):
            async with aiohttp.ClientSession() as s:
                try:
                    async with s.ws_connect(base + "/ws", headers={"Origin": origin}) as w:
                        await w.close()
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status

        assert asyncio.run(ws("http://evil.example")) == 403
        assert asyncio.run(ws(base)) == 101


def test_token_cookie_and_tls(tmp_path):
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "k.pem", "-out", "c.pem", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    opts = WebOptions(
        connect=[f"ipc://{tmp_path}/none"],
        port=0,
        token=TOKEN,
        certfile=str(tmp_path / "c.pem"),
        keyfile=str(tmp_path / "k.pem"),
    )
    ctx = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
    with running_viewer(opts) as v:
        base = f"https://127.0.0.1:{v.port}"
        assert http(base + "/", context=ctx)[0] == 401
        assert http(base + "/?token=wrong-token-wrong-token", context=ctx)[0] == 401
        status, headers, _ = http(base + f"/?token={TOKEN}", context=ctx)
        assert status == 302
        assert headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Secure" in cookie
        assert http(base + "/", {"Cookie": cookie.split(";")[0]}, context=ctx)[0] == 200
        assert http(base + "/", {"Authorization": f"Bearer {TOKEN}"}, context=ctx)[0] == 200
        with pytest.raises(OSError, match=r"(?i)closed|reset|refused|eof"):  # no plain HTTP on TLS
            urllib.request.urlopen(f"http://127.0.0.1:{v.port}/", timeout=5)


# --------------------------------------------------------------------------- latest frame wins


async def _read_frames(ws, seconds: float, ack: bool) -> list[dict]:
    frames = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            m = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            break
        if m.type == aiohttp.WSMsgType.BINARY:
            frames.append(parse_frame_packet(m.data)[0])
            if ack:
                await ws.send_str(json.dumps({"type": "ack"}))
    return frames


def test_a_tab_that_does_not_draw_gets_nothing_more_then_the_newest_frame(tmp_path):
    endpoint = f"ipc://{tmp_path}/masks"
    with (
        FakePublisher(endpoint, rate_hz=40) as pub,
        running_viewer(WebOptions(connect=[endpoint], port=0)) as v,
    ):

        async def scenario():
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{v.port}/ws"
                async with s.ws_connect(url) as idle, s.ws_connect(url) as eager:
                    got_idle, got_eager = await asyncio.gather(
                        _read_frames(idle, 2.0, ack=False), _read_frames(eager, 2.0, ack=True)
                    )
                    published_before_ack = pub.frame_id
                    await idle.send_str(json.dumps({"type": "ack"}))
                    after = await _read_frames(idle, 1.0, ack=False)
                    return got_idle, got_eager, published_before_ack, after

        got_idle, got_eager, before_ack, after = asyncio.run(scenario())
        assert v.hub.received > 40
    assert len(got_idle) == CREDIT  # the hidden tab: two frames, then nothing while it does not ack
    assert len(got_eager) > 5 * CREDIT  # the tab beside it kept getting frames
    ids = [f["frame_id"] for f in got_eager]
    assert ids == sorted(ids)
    assert len(after) == 1
    assert after[0]["frame_id"] >= before_ack


def test_a_page_flooding_commands_gets_busy_replies_not_a_queue(tmp_path):
    opts = WebOptions(
        connect=[f"ipc://{tmp_path}/none"], control=f"ipc://{tmp_path}/silent", port=0, control_timeout_s=0.5
    )
    with running_viewer(opts) as v:

        async def flood():
            async with aiohttp.ClientSession() as s, s.ws_connect(f"http://127.0.0.1:{v.port}/ws") as ws:
                for i in range(8):
                    req = {"cmd": "add", "prompts": [f"p{i}"]}
                    await ws.send_str(json.dumps({"type": "command", "id": i, "request": req}))
                replies = {}
                while len(replies) < 8:
                    m = await ws.receive(timeout=10)
                    data = json.loads(m.data)
                    if data["type"] == "reply":
                        replies[data["id"]] = data["reply"]["error"]["code"]
                return replies

        replies = asyncio.run(flood())
    assert sorted(replies.values()) == ["busy"] * 4 + ["timeout"] * 4  # 4 waited for the node, 4 refused


class LateControl:
    """A control socket that comes up late and answers status/stats, as a node still loading."""

    def __init__(self, endpoint: str, delay_s: float) -> None:
        self.endpoint, self.delay_s = endpoint, delay_s
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        time.sleep(self.delay_s)
        ctx = zmq.Context()
        s = ctx.socket(zmq.REP)
        s.bind(self.endpoint)
        while not self._stop.is_set():
            if s.poll(50):
                cmd = json.loads(s.recv())["cmd"]
                s.send(json.dumps({"ok": True, cmd: {"fps": 9.0, "dropped": {"superseded": 3}}}).encode())
                self.answered += 1
        s.close(linger=0)
        ctx.term()

    def __enter__(self) -> LateControl:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_viewer_started_before_the_node_picks_it_up(tmp_path):
    """demo.sh starts the viewer first: its first control request waits in the queue, the reply
    comes after the viewer gave up on it, and neither that nor the late stream may wedge it."""
    masks, control = f"ipc://{tmp_path}/masks", f"ipc://{tmp_path}/control"
    opts = WebOptions(connect=[masks], control=control, port=0, control_timeout_s=0.3, control_period_s=0.2)
    with LateControl(control, delay_s=1.0) as ctl, running_viewer(opts) as v:
        wait_for(lambda: v.hub.status.get("control", "").startswith("no answer"), 10, "a timed-out request")
        with FakePublisher(masks, rate_hz=20):
            wait_for(lambda: v.hub.received > 5, 20, "frames from the late publisher")
            wait_for(lambda: v.hub.status.get("control") == "ok", 20, "control answering")
            assert v.hub.status["node"]["dropped"] == {"superseded": 3}
            assert ctl.answered >= 2


def test_curve_keys_towards_the_node(tmp_path):
    from bridge.curve import load_curve_client

    keys = tmp_path / "keys"
    keys.mkdir()
    zmq.auth.create_certificates(str(keys), "node")
    zmq.auth.create_certificates(str(keys), "viewer")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(keys / "viewer.key", allowed)
    endpoint = f"ipc://{tmp_path}/masks"
    node_secret = zmq.auth.load_certificate(str(keys / "node.key_secret"))[1]
    curve = load_curve_client(keys / "viewer.key_secret", keys / "node.key")
    with (
        FakePublisher(endpoint, curve=(node_secret, allowed)),
        running_viewer(WebOptions(connect=[endpoint], port=0, curve=curve)) as good,
        running_viewer(WebOptions(connect=[endpoint], port=0)) as plain,
    ):
        wait_for(lambda: good.hub.received > 5, 20, "frames over CURVE")
        assert plain.hub.received == 0
    with pytest.raises(OSError, match="only a public key"):
        load_curve_client(keys / "viewer.key", keys / "node.key")


# --------------------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def live(tmp_path_factory, bundle):
    """A real node replaying the demo clip, the viewer following it, and headless chromium."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "the browser tests need Debian's chromium and chromium-driver "
            "(scripts/test.sh installs them: apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = tmp_path_factory.mktemp("web")
    source = {"kind": "replay", "path": str(DEMO_CLIP), "fps": 10, "loop": True}
    with running_node(tmp, bundle, source, prompts=("left lung", "heart"), include_image=True) as (app, sub):
        opts = WebOptions(connect=[f"ipc://{tmp}/masks"], control=f"ipc://{tmp}/control", port=0)
        with running_viewer(opts) as viewer:
            o = webdriver.ChromeOptions()
            o.binary_location = chromium
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
                o.add_argument(arg)
            o.add_argument("--window-size=1280,900")
            driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=o)
            driver.set_page_load_timeout(30)
            try:
                driver.get(f"http://127.0.0.1:{viewer.port}/")
                yield {"driver": driver, "sub": sub, "app": app, "viewer": viewer, "tmp": tmp}
            finally:
                driver.quit()


def _until(driver, cond, timeout: float = 30.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond(d), f"waiting for {what}")


def _text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def _frames_drawn(driver) -> int:
    return int(driver.execute_script("return Number(document.getElementById('view').dataset.frames || 0)"))


def _newest(sub: Subscriber, wait: float = 10.0):
    msg = sub.receive(timeout=wait)
    while True:  # drain: the subscriber's queue may hold a few
        try:
            msg = sub.receive(timeout=0.05)
        except SubscriberTimeout:
            return msg


CANVAS_DIGEST = """
const c = document.getElementById('view');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let h = 0, lo = 255, hi = 0;
for (let i = 0; i < d.length; i += 4) {
  h = (Math.imul(h, 31) + d[i] + 7 * d[i + 1]) | 0;
  lo = Math.min(lo, d[i]);
  hi = Math.max(hi, d[i]);
}
return [h, c.width, c.height, lo, hi];
"""


def _ids(d, selector: str) -> list[str]:
    """The elements' data-id values, read in one script: the page redraws its lists every frame,
    so element handles fetched one call earlier can already be gone (stale)."""
    return d.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.getAttribute('data-id'))", selector
    )


def test_page_loads_with_legend_figures_and_drops(live):
    d = live["driver"]
    assert d.title == "fluorosam-rt live view"
    _until(d, lambda d: _text(d, "#conn") == "live", what="the WebSocket")
    _until(d, lambda d: _frames_drawn(d) >= 2, what="frames drawn")
    legend = _ids(d, "#legend li")
    assert legend == ["left lung", "heart"]
    _until(d, lambda d: _text(d, "#fps") not in ("–", "0.0"), what="fps")
    _until(d, lambda d: _text(d, "#lat-p99").endswith("ms"), what="latency")
    stages = _text(d, "#stages")
    assert "encode" in stages
    assert "transport" in stages
    _until(d, lambda d: "node" in _text(d, "#dropped"), what="dropped counters from status")
    assert "control ok" in _text(d, "#node").replace("\n", " ")


def test_canvas_changes_as_frames_arrive(live):
    d = live["driver"]
    _until(d, lambda d: _frames_drawn(d) >= 1, what="a first frame")
    h1, w, hgt, lo, hi = d.execute_script(CANVAS_DIGEST)
    n1 = _frames_drawn(d)
    assert (w, hgt) == (256, 256)
    assert hi - lo > 50
    _until(d, lambda d: _frames_drawn(d) >= n1 + 3, what="three more frames")
    h2 = d.execute_script(CANVAS_DIGEST)[0]
    assert h2 != h1


def test_shown_frame_id_follows_the_node(live):
    d, sub = live["driver"], live["sub"]
    for _ in range(3):
        before = _newest(sub).frame_id
        _until(
            d, lambda d, b=before: int(_text(d, "#frame-id") or -1) >= b, 15, f"frame {before} on the page"
        )
        shown = int(_text(d, "#frame-id"))
        after = _newest(sub).frame_id
        assert before <= shown <= after


def _prompt_ids(sub: Subscriber) -> list[str]:
    return [p.id for p in _newest(sub).prompts]


def test_prompt_added_from_the_page_reaches_the_stream_and_goes_again(live):
    d, sub = live["driver"], live["sub"]
    _until(d, lambda d: not d.find_element("id", "add-button").get_attribute("disabled"), what="control")
    d.find_element("id", "prompt-text").send_keys("spine")
    d.find_element("id", "add-button").click()
    _until(d, lambda d: "ok" in (d.find_element("id", "reply").get_attribute("class") or ""), what="reply")
    assert "spine" in _text(d, "#reply")
    wait_for(lambda: _prompt_ids(sub) == ["left lung", "heart", "spine"], 20, "spine in the stream")
    _until(d, lambda d: d.find_elements("css selector", '#legend li[data-id="spine"]'), what="legend")
    d.find_element("css selector", '#prompts li[data-id="spine"] button').click()
    wait_for(lambda: _prompt_ids(sub) == ["left lung", "heart"], 20, "spine removed from the stream")
    _until(d, lambda d: not d.find_elements("css selector", '#prompts li[data-id="spine"]'), what="list")


def test_bad_request_shows_an_error_and_changes_nothing(live):
    d, sub, app = live["driver"], live["sub"], live["app"]
    before = [p.id for p in app.node.prompts.snapshot()]
    d.find_element("id", "prompt-text").send_keys("   ")
    d.find_element("id", "add-button").click()
    _until(d, lambda d: "error" in (d.find_element("id", "reply").get_attribute("class") or ""), what="error")
    assert "bad_prompt" in _text(d, "#reply")
    assert [p.id for p in app.node.prompts.snapshot()] == before
    assert _prompt_ids(sub) == before
    assert _ids(d, "#prompts li") == before


def test_two_tabs_watch_at_once(live):
    d = live["driver"]
    first = d.current_window_handle
    d.switch_to.new_window("tab")
    try:
        d.get(f"http://127.0.0.1:{live['viewer'].port}/")
        _until(d, lambda d: _frames_drawn(d) >= 2, what="frames in the second tab")
        assert len(live["viewer"].hub.tabs) == 2
    finally:
        d.close()
        d.switch_to.window(first)
    wait_for(lambda: len(live["viewer"].hub.tabs) == 1, 10, "the closed tab to leave")


def test_screenshot_is_written(live):
    d = live["driver"]
    _until(d, lambda d: _frames_drawn(d) >= 1, what="a frame")
    path = live["tmp"] / "viewer.png"
    assert d.save_screenshot(str(path))
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > 400
    assert img.shape[1] > 800
    assert img.std() > 10  # a page with a picture on it, not a blank one
