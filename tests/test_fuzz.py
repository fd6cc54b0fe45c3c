"""Property-based fuzzing of every parser that sees network or file input (issue 9).

Each target has a contract: for *any* input it either returns a well-formed result or raises the
typed error its caller catches. Anything else (IndexError, OverflowError, a hang) is a crash the
node would have to survive by luck, so it fails here. The short runs below are part of the suite;
``FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/test_fuzz.py`` is the long
run documented in docs/reliability.md. fuzz/ holds the atheris harnesses for coverage-guided runs
of the same targets (``scripts/fuzz_long.sh``); a few hundred runs of each are part of the suite
(the end of this file), so they cannot rot. Every crash found becomes an explicit regression
example (``@example``) next to its target.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bridge.protocol import (
    MAX_HEADER_BYTES,
    MaskMessage,
    PromptResult,
    ProtocolError,
    decode_message,
    encode_message,
)
from fluorosam_rt.imageio import ImageReadError
from fluorosam_rt.preprocess import Preprocessor
from fluorosam_rt.prompts import Prompt
from fluorosam_rt.service.control import COMMANDS, MAX_REQUEST_BYTES, CommandError, parse_request
from fluorosam_rt.sources import SourceError
from fluorosam_rt.sources.dicom_frames import dataset_frames, dicom_file_frames
from fluorosam_rt.sources.replay import ReplaySource

REPO = Path(__file__).resolve().parents[1]

SHORT = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,  # a loaded shared machine; hangs are caught by the long-run timeout instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("FUZZ_EXAMPLES") is None,  # the suite is reproducible; long runs explore
)


def _explained(exc: Exception, code: str = "-") -> None:
    """A rejection must say why: an operator reads it in a log or an error reply."""
    assert str(exc), f"{type(exc).__name__} without a message"
    assert code, "error without a code"


# --------------------------------------------------------------------------- control requests

json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=10), kids, max_size=6),
    max_leaves=30,
)
prompt_like = st.one_of(
    st.text(max_size=80),
    st.fixed_dictionaries(
        {"text": json_values | st.text(max_size=80)},
        optional={
            "id": json_values | st.text(max_size=70),
            "points": st.lists(st.lists(json_leaf, max_size=3), max_size=20) | json_values,
            "labels": st.lists(json_leaf, max_size=20) | json_values,
            "extra": json_values,
        },
    ),
    json_values,
)
requests = st.one_of(
    st.fixed_dictionaries(
        {"cmd": st.sampled_from(COMMANDS) | st.text(max_size=12)},
        optional={
            "prompts": st.lists(prompt_like, max_size=20) | json_values,
            "ids": st.lists(st.text(max_size=10), max_size=5) | json_values,
            "since": json_values,
            "limit": json_values,
            "junk": json_values,
        },
    ),
    json_values,
)


def _check_request(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except CommandError as exc:
        _explained(exc, exc.code)
        return
    # accepted: exactly what the executor relies on
    assert isinstance(req, dict)
    assert req["cmd"] in COMMANDS
    if req["cmd"] in ("add", "set"):
        assert all(isinstance(p, Prompt) for p in req["prompts"])
        assert req["cmd"] == "set" or req["prompts"]
    if req["cmd"] == "remove":
        assert req["ids"]
        assert all(isinstance(i, str) for i in req["ids"])
    if req["cmd"] == "flow":
        assert type(req["since"]) is int
        assert type(req["limit"]) is int


@SHORT
@given(requests)
@example({"cmd": "add", "prompts": [{"text": "a", "points": [[1, 2]], "labels": [[]]}]})
@example({"cmd": "add", "prompts": [{"text": "a", "points": [[1e400, 2]]}]})
@example({"cmd": "add", "prompts": [{"text": "a", "points": [[True, 2]]}]})
@example({"cmd": "flow", "since": True})
def test_fuzz_parse_request_structured(req) -> None:
    _check_request(json.dumps(req, allow_nan=True).encode())


@SHORT
@given(st.binary(max_size=512))
@example(b"[" * 100_000)
@example(b"\xff\xfe{}")
@example(b'{"cmd": "add", "prompts": ["\\ud800"]}')  # lone surrogate: valid JSON, invalid text
@example(b"1e999999")
def test_fuzz_parse_request_bytes(raw: bytes) -> None:
    _check_request(raw)


def test_parse_request_oversized_is_rejected_before_parsing() -> None:
    with pytest.raises(CommandError) as info:
        parse_request(b" " * (MAX_REQUEST_BYTES + 1))
    assert info.value.code == "too_large"


# --------------------------------------------------------------------------- wire decoding


def _good_frames(n_prompts: int = 2, image: bool = True) -> list[bytes]:
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3] = 1
    msg = MaskMessage(
        stream="carm0",
        frame_id=3,
        seq=7,
        timestamps_ns={"received": 1, "published": 2},
        source={"source": "replay"},
        geometry={},
        source_shape=(12, 16),
        downsample=2,
        encoding="bits",
        prompts=[PromptResult(f"p{i}", f"t{i}", 0.5, True, mask) for i in range(n_prompts)],
        image=np.full((6, 8), 9, np.uint8) if image else None,
    )
    return [bytes(f) if isinstance(f, bytes) else np.asarray(f).tobytes() for f in encode_message(msg)]


def _check_decode(frames: list[bytes]) -> None:
    try:
        msg = decode_message(frames)
    except ProtocolError as exc:
        _explained(exc)
        return
    for p in msg.prompts:
        assert p.mask.shape == msg.mask_shape
        assert p.mask.dtype == np.uint8
    if msg.image is not None:
        assert msg.image.shape == msg.mask_shape


@SHORT
@given(st.data())
def test_fuzz_decode_message_mutations(data) -> None:
    """Truncate, flip bytes in, drop, duplicate or add parts of a valid message."""
    frames = _good_frames(data.draw(st.integers(0, 3)), data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["truncate", "flip", "drop", "dup", "add"]))
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "truncate" and frames:
            frames[i] = frames[i][: data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif op == "flip" and frames and frames[i]:
            b = bytearray(frames[i])
            j = data.draw(st.integers(0, len(b) - 1))
            b[j] ^= data.draw(st.integers(1, 255))
            frames[i] = bytes(b)
        elif op == "drop" and frames:
            del frames[i]
        elif op == "dup" and frames:
            frames.insert(i, frames[i])
        else:
            frames.append(data.draw(st.binary(max_size=64)))
    _check_decode(frames)


header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@SHORT
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.sampled_from([1, 0, 2, "1", None]),
            "kind": st.sampled_from(["masks", "other"]),
            "stream": st.sampled_from(["carm0", ""]) | header_values,
            "frame_id": header_values,
            "seq": header_values,
            "t": header_values,
            "mask": st.fixed_dictionaries(
                {},
                optional={
                    k: st.integers(-3, 70000) | header_values
                    for k in ("height", "width", "downsample", "source_height", "source_width")
                }
                | {"encoding": st.sampled_from(["u8", "bits", "png"])},
            )
            | header_values,
            "prompts": st.lists(header_values, max_size=3) | header_values,
            "image": header_values,
            "model": header_values,
        },
    ),
    st.lists(st.binary(max_size=300), max_size=4),
)
@example({"v": 1, "kind": "masks", "t": {}, "mask": {"height": True}}, [])
def test_fuzz_decode_message_headers(header, payloads) -> None:
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return  # not representable in msgpack: cannot arrive on the wire either
    _check_decode([b"carm0", packed, *payloads])


@SHORT
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_fuzz_decode_message_random_parts(frames) -> None:
    _check_decode(frames)


def test_oversized_header_is_rejected_without_parsing() -> None:
    frames = _good_frames()
    frames[1] = b"\x00" * (MAX_HEADER_BYTES + 1)
    with pytest.raises(ProtocolError, match="more than"):
        decode_message(frames)


# --------------------------------------------------------------------------- DICOM to frames

XA = "1.2.840.10008.5.1.4.1.1.12.1"
PHOTOMETRIC = ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", "", "BOGUS"]


@st.composite
def dicom_datasets(draw) -> pydicom.Dataset:
    """A data set as the SCP gets it: built freely, written to bytes, parsed back lazily."""
    with config.disable_value_validation():
        ds = _draw_dataset(draw)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)


def _raw_ds(ds: pydicom.Dataset, tag: int, value: bytes) -> None:
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), "DS", len(value), value, 0, False, True)


def _draw_dataset(draw) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.SOPClassUID, ds.SOPInstanceUID = XA, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    rows, cols = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    frames = draw(st.integers(0, 4))
    spp = draw(st.sampled_from([1, 1, 1, 3, 0, 2, 4]))
    bits = draw(st.sampled_from([8, 16, 1, 32, 12, 0, 24, 64]))
    stored = draw(st.sampled_from([bits, 12, 1, 8, 16, 0, 40]))
    ds.Rows, ds.Columns = rows, cols
    if draw(st.booleans()):
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = draw(st.sampled_from(PHOTOMETRIC))
    ds.BitsAllocated, ds.BitsStored = bits, stored
    ds.HighBit = draw(st.sampled_from([max(stored - 1, 0), 0, 15, 31]))
    ds.PixelRepresentation = draw(st.sampled_from([0, 1, 2]))
    if spp > 1:
        ds.PlanarConfiguration = draw(st.sampled_from([0, 1, 2]))
    # Decimal strings as raw bytes: a sender can put anything there.
    if draw(st.booleans()):
        _raw_ds(ds, 0x00281053, draw(st.sampled_from([b"1 ", b"0 ", b"-2", b"1e30", b"nan ", b"abc "])))
        _raw_ds(ds, 0x00281052, draw(st.sampled_from([b"0 ", b"-1024 ", b"inf "])))
    if draw(st.booleans()):
        _raw_ds(ds, 0x00281050, draw(st.sampled_from([b"100 ", b"0 ", b"-1e9", b"nan ", b"1\\2 "])))
        _raw_ds(ds, 0x00281051, draw(st.sampled_from([b"200 ", b"0 ", b"-5", b"1 ", b"inf "])))
    if draw(st.booleans()):
        ds.add_new(0x00091010, "LO", "private creator junk")  # private tags are ignored
        ds.add_new(0x00091011, "OB", draw(st.binary(max_size=40)))
    expected = rows * cols * max(frames, 1) * max(spp, 1) * max(bits, 1) // 8
    size = draw(st.sampled_from([expected, expected + 1, max(expected - 1, 0), 0, expected * 2]))
    if draw(st.integers(0, 9)) > 0:
        ds.PixelData = draw(st.binary(min_size=min(size, 4000), max_size=min(size, 4000)))
    return ds


def _regression_ds(**attrs: object) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = XA
    ds.Rows = ds.Columns = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = b"\x00\x00"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@SHORT
@given(dicom_datasets())
@example(_regression_ds(WindowCenter="100", WindowWidth="0"))  # found by this test: plain ValueError
def test_fuzz_dataset_frames(ds) -> None:
    """Any data set either becomes finite 2-D frames or raises ImageReadError (the SCP's 0xC000)."""
    try:
        frames = dataset_frames(ds)
    except ImageReadError as exc:
        _explained(exc)
        return
    assert frames
    for pixels, meta in frames:
        assert pixels.ndim == 2
        assert pixels.size > 0
        if np.issubdtype(pixels.dtype, np.floating):
            assert np.isfinite(pixels).all()
        assert "PatientID" not in meta or isinstance(meta["PatientID"], str)


def _small_dicom_file() -> bytes:
    ds = _regression_ds(
        Rows=4, Columns=4, PhotometricInterpretation="MONOCHROME2", PixelData=bytes(range(16))
    )
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.WindowCenter, ds.WindowWidth = "8", "16"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# Found by fuzz/fuzz_dicom.py: file meta whose group length (UL) is 3 bytes long. pydicom raises
# BytesLengthException from dcmread, which the replay reader did not catch, so `fluorosam-rt
# serve --source replay:FILE` printed a traceback instead of one line.
CORRUPT_FILE_META = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x03\x00abc"


byte_edits = st.lists(
    st.tuples(st.sampled_from(["truncate", "flip", "insert"]), st.integers(0, 400), st.binary(max_size=8)),
    min_size=1,
    max_size=4,
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each mangled value
@SHORT
@given(byte_edits)
@example([("replace", 0, CORRUPT_FILE_META)])
def test_fuzz_dicom_file_bytes(edits) -> None:
    """A small valid DICOM file, truncated, with bytes flipped or inserted, read as the replay
    reader reads a file: finite 2-D frames or ImageReadError."""
    raw = bytearray(_small_dicom_file())
    for op, at, value in edits:
        at = min(at, len(raw))
        if op == "replace":
            raw = bytearray(value)
        elif op == "truncate":
            del raw[at:]
        elif op == "flip" and at < len(raw):
            raw[at] ^= (value[:1] or b"\x01")[0] or 1
        else:
            raw[at:at] = value
    try:
        frames = dicom_file_frames(io.BytesIO(bytes(raw)))
    except ImageReadError as exc:
        _explained(exc)
        return
    assert frames
    for pixels, _meta in frames:
        assert pixels.ndim == 2
        assert pixels.size > 0
        if np.issubdtype(pixels.dtype, np.floating):
            assert np.isfinite(pixels).all()


def test_corrupt_file_meta_in_a_replay_file_is_a_source_error(tmp_path) -> None:
    with pytest.raises(ImageReadError, match="corrupt or unreadable DICOM data"):
        dicom_file_frames(io.BytesIO(CORRUPT_FILE_META))
    bad = tmp_path / "bad_meta.dcm"
    bad.write_bytes(CORRUPT_FILE_META)
    with pytest.raises(SourceError, match=r"bad_meta\.dcm"):
        ReplaySource(bad)


# --------------------------------------------------------------------------- preprocess


dtypes = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_])


@st.composite
def images(draw) -> np.ndarray:
    dtype = draw(dtypes)
    shape = draw(
        st.one_of(
            st.tuples(st.integers(0, 40), st.integers(0, 40)),
            st.tuples(st.integers(0, 20), st.integers(0, 20), st.sampled_from([1, 2, 3, 4, 5])),
            st.tuples(st.integers(1, 3)),
            st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
        )
    )
    kind = draw(st.sampled_from(["random", "constant", "extremes", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = int(info.min), int(info.max)
        if kind == "constant":
            return np.full(shape, draw(st.integers(lo, hi)), dtype)
        if kind == "extremes":
            return rng.choice(np.array([lo, hi], dtype), size=shape)
        return rng.integers(lo, hi, size=shape, dtype=dtype, endpoint=True)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if kind == "special":
        vals = np.array([np.nan, np.inf, -np.inf, 0.0, 1e38, -1e38, 5e-324], dtype=np.float64)
        return rng.choice(vals, size=shape).astype(dtype)
    if kind == "constant":
        return np.full(shape, draw(st.floats(-1e6, 1e6)), dtype)
    if kind == "extremes":
        fi = np.finfo(dtype)
        return rng.choice(np.array([fi.min, fi.max, fi.tiny], dtype), size=shape)
    return (rng.standard_normal(shape) * 1000).astype(dtype)


@pytest.fixture(scope="module")
def preprocessors() -> list[Preprocessor]:
    return [Preprocessor(64), Preprocessor(64, windowing="minmax", window_at="resized")]


@SHORT
@given(images())
@example(np.array([[3.4028235e38]], np.float32))  # found by this test: windowing overflowed to Inf
@example(np.array([[-3.4e38, 3.4e38]], np.float32))
def test_fuzz_preprocess(preprocessors, img) -> None:
    """Any array either becomes a finite model input or raises ValueError (the node's bad_frame)."""
    for pre in preprocessors:
        try:
            x, info = pre(img)
        except ValueError as exc:
            _explained(exc)
            continue
        assert tuple(x.shape) == (3, 64, 64)
        assert bool(x.isfinite().all()), img
        assert info.original_hw == img.shape[:2]


# --------------------------------------------------------------------------- atheris harnesses


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
@pytest.mark.parametrize("target", ["dicom", "control", "wire"])
def test_atheris_harness_runs_clean(target, tmp_path) -> None:
    """A few hundred coverage-guided inputs per harness in a subprocess (libFuzzer owns the
    process): the harness still starts, its seeds meet its contract, nothing crashes."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / f"fuzz_{target}.py"), "-runs=300", "-seed=1"],
        env={**os.environ, "FUZZ_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 300 runs" in proc.stderr, proc.stderr[-4000:]
    assert not list((tmp_path / target).glob("crash-*"))
    assert len(list((tmp_path / target / "seeds").iterdir())) >= 3
