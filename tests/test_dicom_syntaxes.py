"""Every transfer syntax X-ray equipment sends, from a real client to masks on ZeroMQ (issue 20).

Fixtures are real images re-encoded by real encoders at test time: the WG04 CR image RG3
(centre 512x512 of the lossless original, 10-bit) and the highdicom DX image (8-bit) through
dcmtk's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle; the WG04 JPEG 2000 files as their vendor wrote them;
HTJ2K through OpenJPH's ojph_compress. dcmtk's storescu sends each one proposing exactly its
transfer syntax (a config file with one presentation context), so the test proves that syntax
was negotiated and decoded. dcmtk 3.6.7 (Debian 12) predates the HTJ2K UIDs, so pynetdicom's
SCU sends those. Lossy syntaxes are compared with an independent decoder's output (dcmtk's
dcmdjpeg/dcmdjpls, OpenJPH's ojph_expand, GDCM for JPEG 2000).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from bridge import SubscriberTimeout
from fluorosam_rt.dicom_codecs import SYNTAX_BY_KEY, SYNTAXES, decodable_syntaxes
from fluorosam_rt.imageio import ImageReadError, read_dicom_frames
from fluorosam_rt.sources.dicom_scp import DicomStorageSource

sys.path.insert(0, str(Path(__file__).parent))
from test_node import running_node, wait_for
from test_sources import XA, Collector, multiframe_xa

CR = "1.2.840.10008.5.1.4.1.1.1"
MPEG2 = "1.2.840.10008.1.2.4.100"
# Which tool makes each syntax from the uncompressed source (dcmtk options), and from which source.
DCMTK = {
    "implicit": (["dcmconv", "+ti"], "cr"),
    "explicit": (["dcmconv", "+te"], "cr"),
    "deflated": (["dcmconv", "+td"], "cr"),
    "big_endian": (["dcmconv", "+tb"], "cr"),
    "jpeg_baseline": (["dcmcjpeg", "+eb"], "dx"),
    "jpeg_extended": (["dcmcjpeg", "+ee"], "cr"),
    "jpeg_lossless": (["dcmcjpeg", "+el"], "cr"),
    "jpeg_lossless_sv1": (["dcmcjpeg", "+e1"], "cr"),
    "jpegls_lossless": (["dcmcjpls", "+el"], "cr"),
    "jpegls_near_lossless": (["dcmcjpls", "+en"], "cr"),
    "rle": (["dcmcrle"], "cr"),
}
DCMTK_DECODER = {"jpeg_baseline": "dcmdjpeg", "jpeg_extended": "dcmdjpeg", "jpegls_near_lossless": "dcmdjpls"}
VENDOR_J2K = {"j2k_lossless": "RG3_J2KR.dcm", "j2k": "RG3_J2KI.dcm"}
HTJ2K = {"htj2k_lossless": True, "htj2k_lossless_rpcl": True, "htj2k": False}  # reversible?
TOOLS = ("storescu", "dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmdjpeg", "dcmdjpls", "ojph_compress")


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(
            f"{name} is not installed (scripts/test.sh installs dcmtk and openjph-tools)", pytrace=False
        )
    return exe


def _run(*cmd: str) -> None:
    proc = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


def _new_uids(path: Path) -> None:
    """A fresh SOP Instance UID per fixture file, so a message can be matched to its object."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path)


def _htj2k(src: Path, out: Path, key: str, work: Path) -> Path:
    """HTJ2K by OpenJPH from the source's pixels, wrapped in the source's data set; also writes
    ojph_expand's decode of the stream (the independent reference) as a PGM."""
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    pgm = work / f"{key}.pgm"
    pgm.write_bytes(
        f"P5\n{ds.Columns} {ds.Rows}\n{2**ds.BitsStored - 1}\n".encode() + arr.astype(">u2").tobytes()
    )
    j2c = work / f"{key}.j2c"
    opts = ["-reversible", "true"] if HTJ2K[key] else ["-qstep", "0.01"]
    _run("ojph_compress", "-i", str(pgm), "-o", str(j2c), *opts)
    ds.PixelData = encapsulate([j2c.read_bytes()])
    ds.file_meta.TransferSyntaxUID = SYNTAX_BY_KEY[key].uid
    if not HTJ2K[key]:
        ds.LossyImageCompression = "01"
    ds.save_as(out)
    _run("ojph_expand", "-i", str(j2c), "-o", str(work / f"{key}_ref.pgm"))
    return out


def _pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, w, h, maxval, rest = data.split(maxsplit=4)
    assert magic == b"P5"
    return np.frombuffer(rest, ">u2" if int(maxval) > 255 else np.uint8).reshape(int(h), int(w))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, shared_dir):
    """key -> (file to send, reference file whose decode the received frame must equal)."""
    for t in TOOLS:
        _tool(t)
    work = tmp_path_factory.mktemp("syntaxes")
    real = shared_dir / "data" / "dicom"
    cr = pydicom.dcmread(real / "RG3_J2KR.dcm")
    cr.decompress()
    c = (cr.Rows - 512) // 2
    crop = cr.pixel_array[c : c + 512, c : c + 512].copy()
    cr.Rows, cr.Columns, cr.PixelData = 512, 512, crop.tobytes()
    cr.save_as(work / "cr.dcm")
    shutil.copy(real / "dx_image.dcm", work / "dx.dcm")
    out: dict[str, tuple[Path, Path]] = {}
    for key, (cmd, src) in DCMTK.items():
        dst = work / f"{key}.dcm"
        _run(*cmd, str(work / f"{src}.dcm"), str(dst))
        _new_uids(dst)
        ref = work / f"{src}.dcm"
        if key in DCMTK_DECODER:  # lossy: dcmtk's own decode is the reference
            ref = work / f"{key}_ref.dcm"
            _run(DCMTK_DECODER[key], str(dst), str(ref))
        out[key] = (dst, ref)
    for key, name in VENDOR_J2K.items():
        dst = work / name
        shutil.copy(real / name, dst)
        _new_uids(dst)
        out[key] = (dst, dst)  # reference: the same file decoded by GDCM, not OpenJPEG (below)
    for key in HTJ2K:
        out[key] = (_htj2k(work / "cr.dcm", work / f"{key}.dcm", key, work), work / f"{key}_ref.pgm")
    assert sorted(out) == sorted(s.key for s in SYNTAXES)
    return out


def _reference_pixels(key: str, ref: Path) -> np.ndarray:
    if ref.suffix == ".pgm":  # OpenJPH's decode, through our display pipeline
        ds = pydicom.dcmread(ref.with_name("cr.dcm"))
        ds.PixelData = _pgm(ref).astype(np.uint16).tobytes()
        return read_dicom_frames(ds)[0].pixels
    if key in VENDOR_J2K:
        from pydicom.pixels import pixel_array

        ds = pydicom.dcmread(ref)
        stored = pixel_array(ds, decoding_plugin="gdcm")
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.PixelData = stored.tobytes()
        return read_dicom_frames(ds)[0].pixels
    return read_dicom_frames(ref)[0].pixels


def storescu_config(work: Path, sop_class: str, ts_uid: str) -> Path:
    """A storescu configuration that proposes exactly one presentation context."""
    cfg = work / f"propose_{ts_uid}.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + ts_uid + "\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + sop_class + "\\TS\n"
        "[[Profiles]]\n[P]\nPresentationContexts = PC\n"
    )
    return cfg


def send(port: int, path: Path, work: Path) -> subprocess.CompletedProcess | int:
    """Send one file in its own transfer syntax: storescu, or pynetdicom for HTJ2K (dcmtk 3.6.7
    does not know those UIDs). Returns storescu's result or pynetdicom's C-STORE status."""
    ds = pydicom.dcmread(path)
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts.startswith("1.2.840.10008.1.2.4.20"):
        from pynetdicom import AE

        ae = AE(ae_title="CARM1")
        ae.add_requested_context(ds.SOPClassUID, [ts])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title="FSAMTEST")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()
    cfg = storescu_config(work, str(ds.SOPClassUID), ts)
    cmd = [_tool("storescu"), "-xf", str(cfg), "P", "-aec", "FSAMTEST", "-aet", "CARM1"]
    return subprocess.run(
        [*cmd, "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60
    )


def _ok(result: subprocess.CompletedProcess | int) -> bool:
    return result == 0 if isinstance(result, int) else result.returncode == 0


# --------------------------------------------------------------------------- decoders


def test_every_syntax_has_a_decoder_here():
    """pyproject's decoders cover the whole table, so the SCP accepts all of it."""
    assert [s.key for s in decodable_syntaxes()] == [s.key for s in SYNTAXES]


@pytest.mark.parametrize("key", [s.key for s in SYNTAXES])
def test_round_trip_matches_the_reference_decoder(encoded, key):
    path, ref = encoded[key]
    assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == SYNTAX_BY_KEY[key].uid
    got = read_dicom_frames(path)
    assert len(got) == 1
    want = _reference_pixels(key, ref)
    if key == "htj2k":  # OpenJPEG vs OpenJPH: the irreversible wavelet rounds differently
        diff = np.abs(got[0].pixels.astype(np.float64) - want)
        assert diff.max() <= 1.0
        assert np.mean(diff > 0) < 0.005
    else:
        np.testing.assert_array_equal(got[0].pixels, want)


def test_jpeg_extended_12bit_equals_dcmdjpeg_without_stderr_noise(encoded):
    """The GDCM plugin picks the 12-bit codec itself (no "Unsupported JPEG data precision 12")."""
    path, _ = encoded["jpeg_extended"]
    code = (
        "import sys; from fluorosam_rt.imageio import read_dicom_frames; "
        f"print(read_dicom_frames({str(path)!r})[0].pixels.max())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "precision" not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- through the node


@pytest.fixture(scope="module")
def node(tmp_path_factory, bundle):
    tmp = tmp_path_factory.mktemp("node")
    source = {"kind": "dicom", "host": "127.0.0.1", "port": 0, "ae_title": "FSAMTEST", "multiframe_fps": 10}
    # A recorder's settings: neither side of the socket drops. With the defaults (2 queued messages
    # each way) a subscriber that reads only after a 12-frame cine was processed may lose one by
    # design (publish.py); these tests check that every frame is decoded and published.
    with running_node(tmp, bundle, source, prompts=("lungs",), rcvhwm=1000, sndhwm=1000) as (app, sub):
        yield app, sub, tmp


def _messages_for(sub, sop_uid: str, n: int, timeout: float = 30.0) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        try:
            msg = sub.receive(timeout=1.0, newest=False)
        except SubscriberTimeout:
            continue
        if msg.source.get("SOPInstanceUID") == sop_uid:
            got.append(msg)
    return got


@pytest.fixture(scope="module")
def reference(bundle):
    from fluorosam_rt.predictor import Predictor

    return Predictor(bundle.model, bundle.text_encoder, presence_threshold=bundle.presence_threshold)


@pytest.mark.parametrize("key", [s.key for s in SYNTAXES])
def test_each_syntax_goes_from_a_real_sender_to_masks(node, encoded, reference, key):
    app, sub, work = node
    path, ref = encoded[key]
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    result = send(app.node.source.address[1], path, work)
    assert _ok(result), getattr(result, "stderr", result)
    msgs = _messages_for(sub, uid, 1)
    assert msgs, f"{key}: no message for the object"
    msg = msgs[0]
    assert msg.source["TransferSyntaxUID"] == SYNTAX_BY_KEY[key].uid  # negotiated as proposed
    pixels = _reference_pixels(key, ref)
    assert msg.source_shape == pixels.shape
    reference.set_image(pixels)
    want = reference.predict(["lungs"])[0]
    assert np.mean(msg.prompts[0].mask.astype(bool) != want.mask.astype(bool)) < 1e-3


def test_multiframe_jpeg_lossless_cine_every_frame_accounted(node, tmp_path):
    """A 12-frame JPEG Lossless SV1 cine (the usual XA archive syntax) through the node: all 12
    frames are received, and each is published or dropped with a reason."""
    app, sub, work = node
    raw = tmp_path / "cine_raw.dcm"
    multiframe_xa(raw, n_frames=12, rows=64, cols=64)
    cine = tmp_path / "cine.dcm"
    _run("dcmcjpeg", "+e1", str(raw), str(cine))
    wait_for(app.node.idle, 30, "the node to be idle")
    before = app.node.accounting.snapshot()
    assert _ok(send(app.node.source.address[1], cine, work))
    wait_for(lambda: app.node.accounting.snapshot()["received"] == before["received"] + 12, 30, "12 frames")
    wait_for(app.node.idle, 30, "the cine to be processed")
    after = app.node.accounting.snapshot()
    published = after["published"] - before["published"]
    dropped = after["dropped_total"] - before["dropped_total"]
    assert published + dropped == 12, (before, after)
    msgs = _messages_for(sub, str(pydicom.dcmread(cine).SOPInstanceUID), published, timeout=30)
    assert len(msgs) == published
    assert sorted({m.source["frame_index"] for m in msgs}) == sorted(m.source["frame_index"] for m in msgs)
    assert all(m.source["num_frames"] == 12 for m in msgs)


# --------------------------------------------------------------------------- SCP-level checks


@pytest.fixture(scope="module")
def scp():
    src, sink = (
        DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST", multiframe_fps=200),
        Collector(),
    )
    src.start(sink)
    try:
        yield src, sink
    finally:
        src.stop()


def test_multiframe_cine_frames_arrive_in_order_with_their_pixels(scp, tmp_path):
    src, sink = scp
    raw = tmp_path / "cine_raw.dcm"
    multiframe_xa(raw, n_frames=10, rows=64, cols=64)
    ds = pydicom.dcmread(raw)
    del ds.FrameTime
    ds.FrameTimeVector = [0, 5, 5, 5, 5, 5, 5, 5, 5, 5]  # per-frame increments in ms
    ds.save_as(raw)
    cine = tmp_path / "cine.dcm"
    _run("dcmcjpeg", "+e1", str(raw), str(cine))
    n = len(sink.frames)
    assert _ok(send(src.address[1], cine, tmp_path))
    frames = sink.wait(n + 10)[n:]
    ref = read_dicom_frames(raw)
    assert [f.meta["frame_index"] for f in frames] == list(range(10))
    for f, r in zip(frames, ref):
        np.testing.assert_array_equal(f.pixels, r.pixels)
    assert frames[0].meta["frame_interval_ms"] == 5.0


def _sv1(tmp_path: Path, n_frames: int) -> Path:
    raw = tmp_path / f"raw{n_frames}.dcm"
    multiframe_xa(raw, n_frames=n_frames, rows=32, cols=32)
    out = tmp_path / f"sv1_{n_frames}.dcm"
    _run("dcmcjpeg", "+e1", str(raw), str(out))
    return out


def _rewrite(path: Path, out: Path, mutate) -> Path:
    ds = pydicom.dcmread(path)
    mutate(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return out


def _frames(ds) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _truncate(ds) -> None:
    ds.PixelData = encapsulate([f[: int(len(f) * 0.6)] for f in _frames(ds)])


def _zero_tail(ds) -> None:
    ds.PixelData = encapsulate([f[: len(f) // 2] + bytes(len(f) - len(f) // 2) for f in _frames(ds)])


def _garbage_head(ds) -> None:
    ds.PixelData = encapsulate([bytes(range(7, 39)) + f[32:] for f in _frames(ds)])


CORRUPT = {
    "jpeg_lossless_sv1-truncated": ("jpeg_lossless_sv1", _truncate),
    "jpeg_lossless_sv1-zero_tail": ("jpeg_lossless_sv1", _zero_tail),
    "jpeg_baseline-truncated": ("jpeg_baseline", _truncate),
    "jpeg_extended-truncated": ("jpeg_extended", _truncate),
    "jpegls_lossless-truncated": ("jpegls_lossless", _truncate),
    "jpegls_lossless-garbage_head": ("jpegls_lossless", _garbage_head),
    "j2k_lossless-truncated": ("j2k_lossless", _truncate),
    "j2k-zero_tail": ("j2k", _zero_tail),
    "htj2k_lossless-truncated": ("htj2k_lossless", _truncate),
    "rle-truncated": ("rle", _truncate),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_stream_gets_c000_with_a_reason_and_the_association_goes_on(
    scp, encoded, tmp_path, caplog, case
):
    """One storescu association carries the corrupt object and then a good one: 0xC000 with
    the reason in the log for the first, Success and a frame for the second."""
    src, sink = scp
    key, mutate = CORRUPT[case]
    good = _rewrite(encoded[key][0], tmp_path / "good.dcm", lambda ds: None)
    bad = _rewrite(encoded[key][0], tmp_path / "bad.dcm", mutate)
    counts = dict(src.status_counts)
    n = len(sink.frames)
    with caplog.at_level(logging.WARNING, logger="fluorosam_rt.sources.dicom_scp"):
        if key.startswith("htj2k"):
            assert send(src.address[1], bad, tmp_path) == 0xC000
            assert send(src.address[1], good, tmp_path) == 0
        else:
            cfg = storescu_config(tmp_path, str(pydicom.dcmread(good).SOPClassUID), SYNTAX_BY_KEY[key].uid)
            cmd = [
                _tool("storescu"),
                "-v",
                "--no-halt",
                "-xf",
                str(cfg),
                "P",
                "-aec",
                "FSAMTEST",
                "-aet",
                "CARM1",
            ]
            proc = subprocess.run(
                [*cmd, "127.0.0.1", str(src.address[1]), str(bad), str(good)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            log = proc.stdout + proc.stderr
            assert log.count("Requesting Association") == 1, log  # both objects, one association
            assert "CannotUnderstand" in log, log
        frames = sink.wait(n + 1)
    assert src.status_counts.get(0xC000, 0) == counts.get(0xC000, 0) + 1
    assert src.status_counts.get(0x0000, 0) == counts.get(0x0000, 0) + 1
    assert frames[n].meta["SOPInstanceUID"] == str(pydicom.dcmread(good).SOPInstanceUID)
    refusals = [r.getMessage() for r in caplog.records if "0xC000" in r.getMessage()]
    assert refusals, caplog.text
    assert any(w in refusals[-1] for w in ("truncated", "end-of-image", "SOI", "decode", "segment")), refusals


@pytest.mark.parametrize(
    ("declared", "held", "offset_table"),
    [(12, 10, True), (8, 10, True), (12, 10, False), (8, 10, False)],
    ids=["more_declared", "fewer_declared", "more_declared_no_offsets", "fewer_declared_no_offsets"],
)
def test_frame_count_that_disagrees_with_the_data_is_refused(scp, tmp_path, declared, held, offset_table):
    """Frames are counted from the offset table, else from the end-of-image markers."""
    src, _sink = scp

    def mutate(ds) -> None:
        if not offset_table:
            ds.PixelData = encapsulate(_frames(ds), has_bot=False)
        ds.NumberOfFrames = declared

    bad = _rewrite(_sv1(tmp_path, held), tmp_path / "bad.dcm", mutate)
    counts = dict(src.status_counts)
    proc = send(src.address[1], bad, tmp_path)
    assert "0xc000" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0
    assert src.status_counts.get(0xC000, 0) == counts.get(0xC000, 0) + 1
    assert f"NumberOfFrames is {declared}" in src.last_error
    assert f"holds {held} frames" in src.last_error
    # native pixel data too
    raw = multiframe_xa(tmp_path / "native.dcm", n_frames=held, rows=32, cols=32)
    raw.NumberOfFrames = declared
    raw.save_as(tmp_path / "native.dcm", enforce_file_format=True)
    send(src.address[1], tmp_path / "native.dcm", tmp_path)
    assert src.status_counts.get(0xC000, 0) == counts.get(0xC000, 0) + 2
    assert f"NumberOfFrames is {declared}" in src.last_error


def _j2k_object(
    cr: Path, out: Path, bits_stored: int, signed: bool, stream_bits: int
) -> tuple[Path, np.ndarray]:
    """The real CR crop scaled to ``stream_bits``, JPEG 2000 lossless-encoded by OpenJPEG at that
    precision, in an object that says Bits Stored ``bits_stored``."""
    src = pydicom.dcmread(cr)
    img = src.pixel_array[128:384, 128:384].astype(np.int64) * (2**stream_bits - 1) // 1023
    if signed:
        img -= 2 ** (stream_bits - 1)
    arr = img.astype(np.int16 if signed else np.uint16)
    ds = src
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = stream_bits, stream_bits - 1, int(signed)
    for kw in ("WindowCenter", "WindowWidth"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = arr.tobytes()
    ds.compress(pydicom.uid.JPEG2000Lossless, arr)
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out)
    return out, arr


@pytest.mark.parametrize(
    ("bits_stored", "signed", "stream_bits"),
    [(13, False, 13), (15, False, 15), (11, True, 11), (12, False, 16), (12, True, 16)],
    ids=["u13", "u15", "s11", "u12_in_16bit_stream", "s12_in_16bit_stream"],
)
def test_16bit_jpeg2000_with_odd_bits_stored(scp, encoded, tmp_path, bits_stored, signed, stream_bits):
    """Odd Bits Stored decode exactly; a stream more precise than Bits Stored is read at the
    stream's precision (no wrap-around in inversion or windowing) and says so in the metadata."""
    src, sink = scp
    cr = encoded["explicit"][1]  # the uncompressed real CR crop
    path, arr = _j2k_object(cr, tmp_path / "j2k.dcm", bits_stored, signed, stream_bits)
    work = tmp_path
    n = len(sink.frames)
    assert _ok(send(src.address[1], path, work))
    frame = sink.wait(n + 1)[n]
    if signed:
        np.testing.assert_array_equal(frame.pixels.astype(np.int64), arr.astype(np.int64))
    else:
        np.testing.assert_array_equal(frame.pixels, arr)
    if stream_bits > bits_stored:
        assert frame.meta["stream_bits"] == stream_bits
    else:
        assert "stream_bits" not in frame.meta


def test_syntax_without_a_decoder_is_refused_at_negotiation(scp, tmp_path):
    """storescu proposing only MPEG-2 for an XA object gets no presentation context; nothing is
    stored, and pynetdicom sees the context rejected (transfer syntax not supported)."""
    src, _ = scp
    ds = multiframe_xa(tmp_path / "mpeg.dcm", n_frames=2, rows=16, cols=16)
    ds.file_meta.TransferSyntaxUID = MPEG2
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(tmp_path / "mpeg.dcm", enforce_file_format=True)
    counts = dict(src.status_counts)
    proc = send(src.address[1], tmp_path / "mpeg.dcm", tmp_path)
    assert proc.returncode != 0
    assert "presentation context" in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert src.status_counts == counts
    from pynetdicom import AE

    ae = AE(ae_title="SCU")
    ae.add_requested_context(XA, [MPEG2])
    ae.add_requested_context(XA, [pydicom.uid.JPEGLosslessSV1])
    assoc = ae.associate("127.0.0.1", src.address[1], ae_title="FSAMTEST")
    try:
        results = {cx.transfer_syntax[0]: cx.result for cx in assoc.rejected_contexts}
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
    finally:
        assoc.release()
    assert results == {MPEG2: 0x04}  # 0x04: transfer syntaxes not supported (PS3.8 9.3.3.2)
    assert accepted == [pydicom.uid.JPEGLosslessSV1]


def test_accepted_list_follows_the_decoders_installed(monkeypatch, tmp_path):
    """Without a JPEG Lossless decoder the SCP refuses that syntax at association time."""
    import fluorosam_rt.dicom_codecs as codecs

    real = codecs.decoder_plugins
    monkeypatch.setattr(codecs, "decoder_plugins", lambda uid: [] if uid.endswith(".4.70") else real(uid))
    src = DicomStorageSource(host="127.0.0.1", port=0, ae_title="FSAMTEST")
    src.start(Collector())
    try:
        assert pydicom.uid.JPEGLosslessSV1 not in src.transfer_syntaxes
        assert pydicom.uid.JPEG2000Lossless in src.transfer_syntaxes
        proc = send(src.address[1], _sv1(tmp_path, 2), tmp_path)
        assert proc.returncode != 0
        assert src.status_counts == {}
    finally:
        src.stop()


def test_decode_errors_are_one_line_image_read_errors(tmp_path):
    """A file read (replay) of a truncated stream fails the same way, with one clear line."""
    bad = _rewrite(_sv1(tmp_path, 3), tmp_path / "bad.dcm", _truncate)
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_dicom_frames(bad)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- enhanced XA

ENHANCED_XA = "1.2.840.10008.5.1.4.1.1.12.1.1"


def _item(**attrs) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for k, v in attrs.items():
        setattr(item, k, v)
    return item


def enhanced_xa(path: Path, n_frames: int = 4, step_ms: int = 200) -> pydicom.Dataset:
    """An Enhanced XA run whose C-arm rotates and whose window changes frame by frame; geometry
    shared by all frames lives in the Shared Functional Groups, as a modality writes it."""
    rng = np.random.default_rng(2)
    pixels = rng.integers(200, 3800, (n_frames, 48, 64), dtype=np.uint16)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_XA
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_XA, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "XA", "ENH1"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 48, 64, n_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SharedFunctionalGroupsSequence = [
        _item(
            PixelMeasuresSequence=[_item(PixelSpacing=[0.2, 0.25])],
            XRayGeometrySequence=[_item(DistanceSourceToIsocenter=750, DistanceSourceToDetector=1180)],
            PixelValueTransformationSequence=[_item(RescaleIntercept=0, RescaleSlope=1, RescaleType="US")],
        )
    ]
    per_frame = []
    for i in range(n_frames):
        ms = i * step_ms
        per_frame.append(
            _item(
                FrameContentSequence=[
                    _item(
                        FrameAcquisitionDateTime=f"20260102103000.{ms * 1000:06d}",
                        FrameReferenceDateTime=f"20260102103000.{ms * 1000:06d}",
                        FrameAcquisitionNumber=i + 1,
                    )
                ],
                FrameVOILUTSequence=[_item(WindowCenter=1000 + 400 * i, WindowWidth=2400 - 300 * i)],
                PositionerPositionSequence=[
                    _item(PositionerPrimaryAngle=-30 + 12.5 * i, PositionerSecondaryAngle=4 - 2 * i)
                ],
            )
        )
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def _legacy_frame(ds: pydicom.Dataset, i: int) -> np.ndarray:
    """Frame i as a single-frame legacy object with its window at the top level."""
    one = pydicom.Dataset()
    one.file_meta = ds.file_meta
    for kw in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated"):
        setattr(one, kw, getattr(ds, kw))
    one.BitsStored, one.HighBit, one.PixelRepresentation = ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    voi = ds.PerFrameFunctionalGroupsSequence[i].FrameVOILUTSequence[0]
    one.WindowCenter, one.WindowWidth = voi.WindowCenter, voi.WindowWidth
    one.RescaleIntercept, one.RescaleSlope = 0, 1
    n = ds.Rows * ds.Columns * 2
    one.PixelData = ds.PixelData[i * n : (i + 1) * n]
    return read_dicom_frames(one)[0].pixels


def test_enhanced_xa_frames_carry_their_own_window_angles_and_times(scp, tmp_path):
    src, sink = scp
    ds = enhanced_xa(tmp_path / "enh.dcm")
    n = len(sink.frames)
    assert _ok(send(src.address[1], tmp_path / "enh.dcm", tmp_path))
    frames = sink.wait(n + 4)[n : n + 4]
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f.pixels, _legacy_frame(ds, i))  # its own VOI window
        m = f.meta
        assert (m["WindowCenter"], m["WindowWidth"]) == (1000.0 + 400 * i, 2400.0 - 300 * i)
        assert (m["PositionerPrimaryAngle"], m["PositionerSecondaryAngle"]) == (-30 + 12.5 * i, 4.0 - 2 * i)
        assert m["PixelSpacing"] == (0.2, 0.25)
        assert (m["DistanceSourceToIsocenter"], m["DistanceSourceToDetector"]) == (750.0, 1180.0)
        assert m["FrameAcquisitionDateTime"] == f"20260102103000.{i * 200_000:06d}"
        assert m["FrameAcquisitionNumber"] == i + 1
        assert m["frame_interval_ms"] == pytest.approx(200.0)
    assert len({f.pixels.tobytes() for f in frames}) == 4


def test_enhanced_xa_per_frame_values_reach_the_published_messages(node, tmp_path):
    """Each published message carries its own frame's angle and window, not frame 0's."""
    app, sub, work = node
    ds = enhanced_xa(tmp_path / "enh.dcm", n_frames=4, step_ms=300)
    wait_for(app.node.idle, 30, "the node to be idle")
    before = app.node.accounting.snapshot()
    assert _ok(send(app.node.source.address[1], tmp_path / "enh.dcm", work))
    wait_for(lambda: app.node.accounting.snapshot()["received"] == before["received"] + 4, 30, "4 frames")
    wait_for(app.node.idle, 30, "the run to be processed")
    published = app.node.accounting.snapshot()["published"] - before["published"]
    msgs = _messages_for(sub, str(ds.SOPInstanceUID), published, timeout=10)
    assert len(msgs) == published >= 2  # 300 ms apart: a 2-core machine keeps up with most
    for msg in msgs:
        i = msg.source["frame_index"]
        assert msg.geometry["PositionerPrimaryAngle"] == -30 + 12.5 * i
        assert msg.geometry["PositionerSecondaryAngle"] == 4.0 - 2 * i
        assert msg.geometry["PixelSpacing"] == [0.2, 0.25]
        assert msg.geometry["DistanceSourceToIsocenter"] == 750.0
        assert msg.source["WindowCenter"] == 1000.0 + 400 * i
        assert msg.source["FrameAcquisitionDateTime"] == f"20260102103000.{i * 300_000:06d}"
