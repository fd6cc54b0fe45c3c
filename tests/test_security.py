"""Security of the node (issue 9): CURVE on stream and control, DICOM AE allow-list and
association limit, no unpickling of untrusted data, no patient identifiers in logs unless the
DICOM source's log_patient_identifiers flag allows them (DICOM TLS: test_dicom_tls.py)."""

from __future__ import annotations

import ast
import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from bridge.protocol import decode_message
from fluorosam_rt.cli import main as cli_main
from fluorosam_rt.service.node_config import NodeConfigError, load_settings
from fluorosam_rt.service.security import load_keys, load_public_key, make_client
from fluorosam_rt.service.serve import build_app
from fluorosam_rt.sources import create_source
from fluorosam_rt.sources.dicom_scp import DicomStorageSource

sys.path.insert(0, str(Path(__file__).parent))
from test_node import assert_accounting, running_node, wait_for
from test_sources import XA, Collector, _pynetdicom_store, multiframe_xa

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- CURVE


def _sub(endpoint: str, client=None, server_public: bytes | None = None) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if client is not None:
        make_client(s, client, server_public)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def _req(endpoint: str, payload: dict, client=None, server_public: bytes | None = None, timeout=3.0):
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    s.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    if client is not None:
        make_client(s, client, server_public)
    try:
        s.connect(endpoint)
        s.send(json.dumps(payload).encode())
        return json.loads(s.recv())
    except zmq.Again:
        return None
    finally:
        s.close(linger=0)


def test_curve_admits_allowed_clients_and_no_one_else(tmp_path, bundle, capsys):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    for name in ("node", "carm_viewer", "intruder"):
        assert cli_main(["keys", "generate", "--dir", str(keys), "--name", name]) == 0
    allowed.mkdir()
    (allowed / "carm_viewer.key").write_bytes((keys / "carm_viewer.key").read_bytes())
    assert (keys / "node.key_secret").stat().st_mode & 0o077 == 0
    capsys.readouterr()

    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    cv2.imwrite(str(frames / "0.png"), np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))
    # tcp on localhost: CURVE matters for tcp; ipc peers are checked the same way
    settings = load_settings(
        None,
        {
            "source": {"kind": "replay", "path": str(frames), "fps": 10, "loop": True},
            "publish": {"endpoints": ["tcp://127.0.0.1:*"]},
            "control": {"endpoint": "tcp://127.0.0.1:*"},
            "security": {
                "curve_secret_key": str(keys / "node.key_secret"),
                "curve_allowed_clients": str(allowed),
            },
            "prompts": ["lungs"],
        },
    )
    app = build_app(settings, bundle=bundle)
    pub_ep, ctl_ep = app.node.publisher.endpoints[0], app.control.endpoint
    server = load_public_key(keys / "node.key")
    good, bad = load_keys(keys / "carm_viewer.key_secret"), load_keys(keys / "intruder.key_secret")
    socks = [_sub(pub_ep, good, server), _sub(pub_ep, bad, server), _sub(pub_ep)]
    try:
        time.sleep(0.3)
        app.start()
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        got = {i: 0 for i in range(3)}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (got[0] < 3 or time.monotonic() < deadline - 25):
            for s, _ in poller.poll(200):
                i = socks.index(s)
                decode_message(s.recv_multipart())  # what arrives is a valid, decrypted message
                got[i] += 1
        assert got[0] >= 3, got  # the allowed client receives masks
        assert got[1] == 0, got  # a client with an unknown key receives nothing
        assert got[2] == 0, got  # nor does a plain (non-CURVE) client

        prompts0 = [p.id for p in app.node.prompts.snapshot()]
        # the allowed client can command ...
        reply = _req(ctl_ep, {"cmd": "list"}, good, server)
        assert reply is not None
        assert reply["ok"]
        # ... the others cannot even get a reply, and nothing changes
        assert _req(ctl_ep, {"cmd": "add", "prompts": ["heart"]}, bad, server) is None
        assert _req(ctl_ep, {"cmd": "shutdown"}) is None
        assert [p.id for p in app.node.prompts.snapshot()] == prompts0
        assert not app.node.stopping
        assert app.control.requests == 1
    finally:
        for s in socks:
            s.close(linger=0)
        final = app.stop()
    assert_accounting(final)


def test_curve_settings_go_together(tmp_path):
    with pytest.raises(NodeConfigError, match="go together"):
        load_settings(
            None,
            {"source": {"kind": "replay", "path": "x"}, "security": {"curve_secret_key": str(tmp_path)}},
        )


# --------------------------------------------------------------------------- DICOM


def test_dicom_association_limit_and_unknown_ae(tmp_path):
    """One association at a time: a second sender is refused while the first is open."""
    from pynetdicom import AE

    src = DicomStorageSource(
        host="127.0.0.1", port=0, ae_title="FSAMTEST", allowed_calling_aes=["CARM1"], max_associations=1
    )
    src.start(Collector())
    held = None
    try:
        port = src.address[1]
        ae = AE(ae_title="CARM1")
        ae.add_requested_context(XA)
        ae.acse_timeout = ae.network_timeout = 10
        held = ae.associate("127.0.0.1", port, ae_title="FSAMTEST")
        assert held.is_established
        ds = multiframe_xa(tmp_path / "a.dcm", n_frames=1)
        status, second = _pynetdicom_store(port, ds, [XA], calling="CARM1")
        assert status is None
        assert not second.is_established
        held.release()
        held = None
        wait_for(lambda: _pynetdicom_store(port, ds, [XA], calling="CARM1")[0] is not None, 10, "a free slot")
        status, unknown = _pynetdicom_store(port, ds, [XA], calling="STRANGER")
        assert status is None
        assert unknown.is_rejected
    finally:
        if held is not None:
            held.abort()
        src.stop()


# --------------------------------------------------------------------------- no pickle / eval


_FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "loads"),
    ("marshal", "loads"),
    ("dill", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("numpy", "load"),  # only with allow_pickle=False, checked below
    ("np", "load"),
}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
            out.append(f"{where}: {f.id}()")
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            pair = (f.value.id, f.attr)
            if pair in (("np", "load"), ("numpy", "load")):
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    out.append(f"{where}: np.load with allow_pickle")
            elif pair in _FORBIDDEN_CALLS:
                out.append(f"{where}: {pair[0]}.{pair[1]}()")
            if pair == ("torch", "load"):
                v = kw.get("weights_only")
                safe = isinstance(v, ast.Constant) and v.value is True
                # checkpoint.py's one opt-in: weights_only=not trust_pickle (an explicit CLI flag)
                opt_in = isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.Not)
                if not (safe or opt_in):
                    out.append(f"{where}: torch.load without weights_only=True")
    return out


def test_no_pickle_or_eval_of_untrusted_data_anywhere():
    """Network and file input is never unpickled or evaluated; checkpoints load weights_only.

    Scoped to what runs next to the patient (node, bridge, engines, scripts). Training code
    resuming its own checkpoints is another trust domain and is not scanned.
    """
    roots = ["fluorosam_rt", "bridge", "engines", "scripts"]
    files = [p for r in roots if (REPO / r).is_dir() for p in (REPO / r).rglob("*.py")]
    assert len(files) > 30
    bad = [v for f in files for v in _violations(f)]
    assert not bad, "\n".join(bad)


def test_the_lint_catches_what_it_should(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    f = tmp_path / "evil.py"
    f.write_text(
        "import pickle, torch, yaml, numpy as np\n"
        "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "yaml.load('a')\neval('1')\nnp.load('a', allow_pickle=True)\n"
    )
    assert len(_violations(f)) == 6


# --------------------------------------------------------------------------- logs


def test_logs_carry_no_patient_identifiers(tmp_path, bundle, caplog):
    """The default (log_patient_identifiers off), at DEBUG level, for a good and a refused object."""
    caplog.set_level(logging.DEBUG)
    source = {"kind": "dicom", "host": "127.0.0.1", "port": 0, "ae_title": "FSAMTEST"}
    ds = multiframe_xa(tmp_path / "a.dcm", n_frames=2)
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "PID-93841", "Doe^Jane", "19700101"
    ds.AccessionNumber = "ACC-5521"
    bad = multiframe_xa(tmp_path / "b.dcm", n_frames=1)
    bad.PatientID, bad.PatientName, bad.AccessionNumber = "PID-93841", "Doe^Jane", "ACC-5521"
    bad.BitsAllocated = 12  # refused: the rejection is logged/reported without the patient
    with running_node(tmp_path, bundle, source) as (app, sub):
        port = app.node.source.address[1]
        assert _pynetdicom_store(port, ds, [XA])[0].Status == 0
        assert _pynetdicom_store(port, bad, [XA])[0].Status == 0xC000
        msg = sub.receive(timeout=30)
        status = json.dumps(app.control.handle(b'{"cmd": "status"}'))
        stats = json.dumps(app.control.handle(b'{"cmd": "stats"}'))
        wait_for(lambda: app.node.accounting.snapshot()["received"] == 2 and app.node.idle(), 30, "2 frames")
    assert msg.source["PatientID"] == "PID-93841"  # the stream carries it (a SEG needs it) ...
    text = caplog.text + status + stats + json.dumps(app.final)
    assert "C-STORE from SCU: status 0x0000" in caplog.text  # receipt is logged, without the patient
    for ident in ("PID-93841", "Doe^Jane", "Doe", "19700101", "ACC-5521"):
        assert ident not in text, ident  # ... logs and status do not
    assert threading.active_count() < 50


def test_log_patient_identifiers_flag_names_them_on_receipt(tmp_path, caplog):
    """``log_patient_identifiers: true`` (a site's choice, e.g. to trace an object): the receipt
    line names PatientID and AccessionNumber, for accepted and refused objects alike."""
    caplog.set_level(logging.DEBUG, logger="fluorosam_rt.sources.dicom_scp")
    settings = load_settings(
        None,
        {
            "source": {
                "kind": "dicom",
                "host": "127.0.0.1",
                "port": 0,
                "ae_title": "FSAMTEST",
                "log_patient_identifiers": True,
            }
        },
    )
    assert load_settings(None, {"source": {"kind": "dicom"}}).source.log_patient_identifiers is False
    src, sink = create_source(settings.source), Collector()
    ds = multiframe_xa(tmp_path / "a.dcm", n_frames=1)
    ds.PatientID, ds.AccessionNumber, ds.PatientName = "PID-93841", "ACC-5521", "Doe^Jane"
    bad = multiframe_xa(tmp_path / "b.dcm", n_frames=1)
    bad.PatientID, bad.AccessionNumber = "PID-77", "ACC-78"
    bad.BitsAllocated = 12
    src.start(sink)
    try:
        port = src.address[1]
        assert _pynetdicom_store(port, ds, [XA], calling="CARM1")[0].Status == 0
        assert _pynetdicom_store(port, bad, [XA], calling="CARM1")[0].Status == 0xC000
        sink.wait(1)
    finally:
        src.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "fluorosam_rt.sources.dicom_scp"]
    assert "C-STORE from CARM1: status 0x0000 PatientID=PID-93841 AccessionNumber=ACC-5521" in lines
    assert "C-STORE from CARM1: status 0xC000 PatientID=PID-77 AccessionNumber=ACC-78" in lines
    assert "Doe^Jane" not in caplog.text  # the flag covers the two identifiers a site traces by
