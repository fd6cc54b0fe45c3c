"""The bridge without a model: asyncio subscriber, gap and version errors on real sockets,
geometry, coded anatomy, device names, the torch-free guarantees, and the bridge CLI.
"""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from bridge import MaskMessage, PromptResult, ProtocolVersionError, encode_message
from bridge.aio import AsyncSubscriber
from bridge.codes import code_for_prompt
from bridge.geometry import ijk_to_ras
from bridge.subscriber import FrameGapError, Subscriber

REPO = Path(__file__).resolve().parents[1]
BRIDGE = REPO / "bridge"
CORE_DEPS = {"numpy", "zmq", "msgpack", "bridge", "__future__"}
# Modules that need an optional extra (igtl, seg, web), and what each may import beyond the core.
EXTRAS = {
    "igtl_relay.py": {"pyigtl"},
    "seg_archive.py": {"highdicom", "pydicom", "pynetdicom"},
    "cli.py": set(),
    "web.py": {"aiohttp"},
    "web_packet.py": {"PIL"},  # the web viewer's JPEG of the display image; no other module
}
NEVER = {"torch", "fluorosam_rt", "engines", "train", "cv2", "PIL", "torchvision"}


def _msg(frame_id: int, seq: int, shape=(6, 8), geometry=None, stream="carm0") -> MaskMessage:
    m = np.zeros(shape, np.uint8)
    m[1:3, 2:5] = 1
    return MaskMessage(
        stream=stream,
        frame_id=frame_id,
        seq=seq,
        timestamps_ns={"source": 1_700_000_000_000_000_000 + frame_id},
        source={"source": "replay"},
        geometry=geometry or {},
        source_shape=shape,
        downsample=1,
        encoding="bits",
        prompts=[PromptResult("left lung", "left lung", 0.8, True, m)],
    )


@pytest.fixture
def pub(tmp_path):
    sock = zmq.Context.instance().socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/pub"
    sock.bind(endpoint)
    try:
        yield sock, endpoint
    finally:
        sock.close(0)


# --------------------------------------------------------------------------- subscribers


def test_async_subscriber_newest_wins_and_counts_gaps(pub):
    sock, endpoint = pub

    async def scenario():
        sub = AsyncSubscriber(endpoint, topic="carm0", rcvhwm=100)
        try:
            await asyncio.sleep(0.3)
            for i in range(3):
                sock.send_multipart(encode_message(_msg(i, i)))
            await asyncio.sleep(0.2)
            newest = await sub.receive(timeout=5)  # frames 0 and 1 are skipped, not lost
            sock.send_multipart(encode_message(_msg(9, 7)))  # seqs 3..6 never arrive
            after_gap = await sub.receive(timeout=5)
            return newest, after_gap, sub.gaps
        finally:
            sub.close()

    newest, after_gap, gaps = asyncio.run(scenario())
    assert newest.frame_id == 2
    assert after_gap.frame_id == 9
    assert (gaps.skipped, gaps.lost, gaps.node_dropped, gaps.received) == (2, 4, 2, 2)


@pytest.mark.parametrize("kind", ["blocking", "asyncio"])
def test_gap_error_when_asked_and_version_mismatch(pub, kind):
    sock, endpoint = pub
    frames = [bytes(f) for f in encode_message(_msg(5, 5))]
    header = msgpack.unpackb(frames[1])
    header["v"] = 99
    bad_version = [frames[0], msgpack.packb(header), *frames[2:]]

    def send_all():
        time.sleep(0.3)
        sock.send_multipart(encode_message(_msg(0, 0)))
        time.sleep(0.1)
        sock.send_multipart(encode_message(_msg(4, 3)))
        time.sleep(0.1)
        sock.send_multipart(bad_version)

    if kind == "blocking":
        sub = Subscriber(endpoint, on_gap="raise")
        try:
            send_all()
            assert sub.receive(timeout=5, newest=False).frame_id == 0
            with pytest.raises(FrameGapError, match="2 message\\(s\\) lost between frame 0 and frame 4") as e:
                sub.receive(timeout=5, newest=False)
            assert e.value.lost == 2
            assert e.value.message.frame_id == 4
            with pytest.raises(ProtocolVersionError, match="version 99"):
                sub.receive(timeout=5, newest=False)
        finally:
            sub.close()
        return

    async def scenario():
        sub = AsyncSubscriber(endpoint, on_gap="raise")
        try:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(send_all)
            assert (await sub.receive(timeout=5, newest=False)).frame_id == 0
            with pytest.raises(FrameGapError, match="lost between frame 0 and frame 4"):
                await sub.receive(timeout=5, newest=False)
            with pytest.raises(ProtocolVersionError):
                await sub.receive(timeout=5, newest=False)
        finally:
            sub.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- geometry and names


def test_ijk_to_ras_uses_the_best_known_pixel_size():
    m, size = ijk_to_ras({"PixelSpacing": [0.5, 0.25]}, (4, 6), 1)
    assert size.basis == "PixelSpacing"
    np.testing.assert_allclose(m[:3, 0], [-0.25, 0, 0])  # columns run to the patient's left
    np.testing.assert_allclose(m[:3, 1], [0, 0, -0.5])  # rows run to the feet
    centre = m @ np.array([2.5, 1.5, 0, 1])  # the image centre sits at the origin
    np.testing.assert_allclose(centre[:3], 0, atol=1e-12)
    m, size = ijk_to_ras({"ImagerPixelSpacing": [0.3, 0.3]}, (4, 6), 2)
    assert size.basis == "ImagerPixelSpacing"
    np.testing.assert_allclose(np.linalg.norm(m[:3, 0]), 0.6)
    _, size = ijk_to_ras({"PixelSpacing": None, "ImagerPixelSpacing": [0, 0]}, (4, 6), 1)
    assert not size.known


def test_relay_without_geometry_uses_1mm_and_warns_once(caplog):
    pytest.importorskip("pyigtl")
    from bridge.igtl_relay import IgtlRelay, device_name

    class NoServer:
        pass

    relay = IgtlRelay(server=NoServer())
    with caplog.at_level(logging.WARNING, logger="bridge.igtl_relay"):
        first = relay.messages_for(_msg(1, 1))
        relay.messages_for(_msg(2, 2))
    assert sum("no pixel spacing" in r.message for r in caplog.records) == 1
    image, status = first
    np.testing.assert_allclose(np.abs(image.ijk_to_world_matrix[:3, :3]).sum(axis=0), [1, 1, 1])
    assert image.device_name == device_name("left lung") == "FluoroSAM_left_lung"
    assert image.timestamp == pytest.approx(1_700_000_000.000000001)
    assert status.device_name == "FluoroSAM_status"
    long_a, long_b = device_name("a" * 30 + "x"), device_name("a" * 30 + "y")
    assert long_a != long_b
    assert len(long_a) <= 20
    assert device_name("a" * 30 + "x") == long_a


def test_codes_match_the_dicom_tables_and_unknowns_stay_generic():
    from pydicom.sr.codedict import codes

    from bridge import codes as table

    sct = {}
    for name in dir(codes.SCT):
        try:
            c = getattr(codes.SCT, name)
        except AttributeError:
            continue
        if hasattr(c, "value") and hasattr(c, "meaning"):
            sct.setdefault(c.value, set()).add(c.meaning)  # one concept, several keywords
    for value, meaning in table._ANATOMY.values():
        assert meaning in sct.get(value, set()), (value, meaning)
    for c in (table.LEFT, table.RIGHT, table.ANATOMICAL_STRUCTURE, table.PHYSICAL_OBJECT):
        assert c.meaning in sct.get(c.value, set())
    c = code_for_prompt("The patient's LEFT lung")
    assert (c.type.value, c.laterality, c.coded) == ("39607008", table.LEFT, True)
    assert code_for_prompt("lungs").type.meaning == "Lung"
    assert code_for_prompt("stent").category == table.PHYSICAL_OBJECT
    assert not code_for_prompt("left heart").coded  # "left" only qualifies paired structures
    unknown = code_for_prompt("guidewire tip")
    assert (unknown.coded, unknown.type, unknown.label) == (
        False,
        table.ANATOMICAL_STRUCTURE,
        "guidewire tip",
    )


# --------------------------------------------------------------------------- torch-free


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_bridge_modules_import_only_their_declared_dependencies():
    """Static, over every file in bridge/ (subfolders too): the core needs numpy, pyzmq and
    msgpack only; each extra module only its declared extra; nothing imports the model stack."""
    stdlib = set(sys.stdlib_module_names)
    paths = sorted(BRIDGE.rglob("*.py"))
    assert len(paths) >= 10
    for path in paths:
        names = _imports(path) - stdlib
        extra = EXTRAS.get(path.name, set())
        assert not (names & NEVER) - extra, f"{path.name} imports {names & NEVER}"
        allowed = CORE_DEPS | extra
        assert names <= allowed, f"{path.name} imports {names - allowed}"


def test_bridge_runs_with_torch_unimportable(tmp_path, pub):
    """Dynamic: every bridge module imports, and ``fluorosam-rt bridge listen`` receives real
    messages, in a process where ``import torch`` fails."""
    sock, endpoint = pub
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import bridge, bridge.aio, bridge.cli, bridge.codes, bridge.geometry, bridge.recorder\n"
        "import bridge.igtl_relay, bridge.seg_archive, bridge.web, bridge.web_packet\n"
        "from fluorosam_rt.cli import main\n"
        f"rc = main(['bridge', 'listen', '--connect', {endpoint!r}, '--max-messages', '2',\n"
        "            '--idle-timeout', '20'])\n"
        "assert not [k for k, v in sys.modules.items() if v is not None and k.split('.')[0] == 'torch']\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        i = 0
        while proc.poll() is None and time.monotonic() < deadline:
            sock.send_multipart(encode_message(_msg(i, i)))
            i += 1
            time.sleep(0.1)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert all(line.endswith("prompts 1 sums 6") for line in lines), out


def test_bridge_in_a_fresh_venv_without_torch(tmp_path, pub):
    """The bridge built as its own wheel (bridge/pyproject.toml) and installed into a new venv that
    holds only numpy, pyzmq and msgpack (linked from this one): torch is not installed there at
    all, so nothing can reach it by accident, and the wheel declares nothing heavier."""
    sock, endpoint = pub
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    here = Path(np.__file__).parents[1]
    wanted = ["numpy", "numpy.libs", "zmq", "pyzmq.libs", "msgpack"]
    for name in wanted:
        if (here / name).exists():
            os.symlink(here / name, site / name)
    wheels = tmp_path / "wheels"
    src = tmp_path / "src" / "bridge"  # build a copy: building writes build/ and egg-info next to the sources
    shutil.copytree(BRIDGE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("fluorosam_rt_bridge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith("METADATA"))
        requires = [
            line.split(":", 1)[1].strip()
            for line in zf.read(meta).decode().splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        ]
    assert sorted(r.split(">")[0] for r in requires) == ["msgpack", "numpy", "pyzmq"]
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is installed here'\n"
        "from bridge import Subscriber\n"
        f"sub = Subscriber({endpoint!r})\n"
        "msg = sub.receive(timeout=20)\n"
        "print(msg.frame_id, int(msg.prompts[0].mask.sum()))\n"
    )
    proc = subprocess.Popen(
        [py, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            sock.send_multipart(encode_message(_msg(3, 3)))
            time.sleep(0.1)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.split() == ["3", "6"]


# --------------------------------------------------------------------------- CLI


def test_bridge_igtl_command_relays_to_a_pyigtl_client(tmp_path, pub):
    """``fluorosam-rt bridge igtl`` as an operator runs it, torch blocked, with a pyigtl client."""
    pyigtl = pytest.importorskip("pyigtl")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sock, endpoint = pub
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from fluorosam_rt.cli import main\n"
        f"sys.exit(main(['bridge', 'igtl', '--connect', {endpoint!r}, '--port', '{port}',\n"
        "               '--max-messages', '20']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    client = None
    try:
        assert "OpenIGTLink server on port" in proc.stdout.readline()
        client = pyigtl.OpenIGTLinkClient("127.0.0.1", port)
        geometry = {"PixelSpacing": [0.5, 0.5]}
        image = None
        for i in range(20):
            sock.send_multipart(encode_message(_msg(i, i, geometry=geometry)))
            image = client.wait_for_message("FluoroSAM_left_lung", timeout=0.3)
            if image is not None:
                break
        assert image is not None, "no IMAGE message reached the client"
        assert image.image[0].sum() == 6
        np.testing.assert_allclose(np.linalg.norm(image.ijk_to_world_matrix[:3, 1]), 0.5, rtol=1e-6)
        frame = round((image.timestamp - 1_700_000_000) * 1e9)
        assert 0 <= frame < 20
        for i in range(20, 40):
            if proc.poll() is not None:
                break
            sock.send_multipart(encode_message(_msg(i, i, geometry=geometry)))
            time.sleep(0.05)
        out, err = proc.communicate(timeout=20)
    finally:
        if client is not None:
            client.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "relayed 20 frames" in out


def test_relay_sends_tips_as_points_and_the_axis_as_a_transform_to_a_pyigtl_client():
    """Tip (POINT) and axis (TRANSFORM) land where the IMAGE's own matrix puts the mask's pixels;
    a geometry-only message sends them without any IMAGE."""
    pyigtl = pytest.importorskip("pyigtl")
    from bridge.igtl_relay import AXIS_PREFIX, TIP_PREFIX, IgtlRelay, device_name

    sys.path.insert(0, str(Path(__file__).parent))
    from test_protocol import _geometry_message

    msg = _geometry_message(d=2)
    wire = msg.prompts[1].geometry.instances[0]
    relay = IgtlRelay(port=0)
    client = pyigtl.OpenIGTLinkClient("127.0.0.1", relay.port)
    try:
        deadline = time.monotonic() + 10
        while not relay.server.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        relay.relay(msg)
        point = client.wait_for_message(device_name("K-wire", TIP_PREFIX), timeout=5)
        axis = client.wait_for_message(device_name("K-wire", AXIS_PREFIX), timeout=5)
        image = client.wait_for_message(device_name("K-wire"), timeout=5)
        msg.planes = False
        for p in msg.prompts:
            p.mask = None
        kinds = [type(m).__name__ for m in relay.messages_for(msg)]
        assert kinds == ["PointMessage", "TransformMessage", "StringMessage"]  # no IMAGE without planes
    finally:
        client.stop()
        relay.close()
    assert point is not None
    assert axis is not None
    assert image is not None
    # the tip through the IMAGE's matrix: mask index of the tip's source pixel (x, y) is (x - 0.5) / 2
    ijk = np.array([(wire.tip[0] - 0.5) / 2, (wire.tip[1] - 0.5) / 2, 0.0, 1.0])
    expected = (image.ijk_to_world_matrix @ ijk)[:3]
    np.testing.assert_allclose(np.asarray(point.positions, float).reshape(-1, 3)[0], expected, atol=1e-3)
    assert point.names[0] == f"K-wire#{wire.id}"
    m = np.asarray(axis.matrix)
    np.testing.assert_allclose(m[:3, 3], expected, atol=1e-3)
    np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-5)  # a rotation
    z = m[:3, 2]  # along the tool towards the tip: columns run to -R (left), rows to -S (feet)
    want = np.array([-wire.axis[0], 0.0, -wire.axis[1]])
    np.testing.assert_allclose(z, want / np.linalg.norm(want), atol=1e-4)
