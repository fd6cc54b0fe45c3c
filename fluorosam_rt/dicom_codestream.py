"""Check a DICOM object's pixel data before a decoder sees it: frame count, and each frame's
compressed stream (markers, size, precision).

Why: decoders are permissive. libjpeg decodes a JPEG whose second half is zeros into an image
with garbage in it and only prints a warning; a frame count that disagrees with the data makes
pydicom warn and guess. Either would be segmented and published as if it were a real X-ray. A
stream's header also says what the decoder will produce, so checking it against Rows, Columns
and Samples per Pixel first gives a one-line reason ("JPEG frame 3 is 512x512, the data set
says 1024x1024") instead of a decoder's error, and never lets a decoder write a frame of
another size. The checks read headers only: microseconds per frame.

What is checked:

* native pixel data: its length is NumberOfFrames frames (plus at most one pad byte);
* encapsulated pixel data: the number of frames found (Basic or Extended Offset Table, else
  fragments grouped up to each end-of-image marker, else one fragment per RLE frame) equals
  NumberOfFrames;
* each JPEG / JPEG-LS frame: starts with SOI, has a SOF whose size and components match, and
  ends with EOI (a truncated stream has none); each JPEG 2000 / HTJ2K frame: SOC then SIZ with
  the same size and components, ending with EOC; each RLE frame: a header whose segment count
  is Samples per Pixel x bytes per sample, with offsets inside the frame.

A frame's stream precision is returned, because a 16-bit JPEG 2000 stream in an object that
says Bits Stored 12 is common: the display pipeline then uses the stream's precision.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass, field
from typing import Any

from .image_errors import ImageReadError

JPEG_FAMILY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
}
JPEGLS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
J2K_FAMILY = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
RLE = "1.2.840.10008.1.2.5"
_EOI = b"\xff\xd9"  # JPEG EOI and JPEG 2000 EOC share these bytes
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass
class PixelDataCheck:
    """What the checks learned: the frame count, and the largest stream precision (or None)."""

    n_frames: int
    precision: int | None = None
    signed: bool | None = None
    notes: list[str] = field(default_factory=list)


def _strip_padding(frame: bytes) -> bytes:
    """Drop the bytes after the end marker: fragments are padded to an even length, with 0x00
    or (seen in the WG04 J2K test images) 0xFF."""
    end = len(frame)
    while end > 0 and frame[end - 1] in (0x00, 0xFF):
        end -= 1
    return frame[:end]


def _jpeg_header(frame: bytes, i_frame: int) -> tuple[int, int, int, int]:
    """(precision, rows, columns, components) from the SOF (or JPEG-LS SOF55) marker."""
    if frame[:2] != b"\xff\xd8":
        raise ImageReadError(f"JPEG frame {i_frame} does not start with an SOI marker")
    i, n = 2, len(frame)
    while i + 4 <= n:
        if frame[i] != 0xFF:
            raise ImageReadError(f"JPEG frame {i_frame}: corrupt marker structure at byte {i}")
        marker = frame[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        is_sof = (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7
        if is_sof:
            if i + 10 > n:
                break
            p = frame[i + 4]
            rows = int.from_bytes(frame[i + 5 : i + 7], "big")
            cols = int.from_bytes(frame[i + 7 : i + 9], "big")
            return p, rows, cols, frame[i + 9]
        if marker == 0xDA:
            break
        i += 2 + length
    raise ImageReadError(f"JPEG frame {i_frame} has no frame header (SOF marker) before its scan")


def _j2k_header(frame: bytes, i_frame: int) -> tuple[int, bool, int, int, int]:
    """(precision, signed, rows, columns, components) from the SIZ marker."""
    start = 0
    if frame.startswith(_JP2_SIGNATURE):  # a JP2 file instead of a bare codestream: find it
        start = frame.find(b"\xff\x4f\xff\x51")
        if start < 0:
            raise ImageReadError(f"JPEG 2000 frame {i_frame}: JP2 box without a codestream")
    if frame[start : start + 4] != b"\xff\x4f\xff\x51":
        raise ImageReadError(f"JPEG 2000 frame {i_frame} does not start with SOC and SIZ markers")
    s = frame[start + 4 :]
    if len(s) < 41:
        raise ImageReadError(f"JPEG 2000 frame {i_frame}: SIZ marker cut short")
    xsiz, ysiz = int.from_bytes(s[4:8], "big"), int.from_bytes(s[8:12], "big")
    xo, yo = int.from_bytes(s[12:16], "big"), int.from_bytes(s[16:20], "big")
    csiz = int.from_bytes(s[36:38], "big")
    ssiz = s[38]
    return (ssiz & 0x7F) + 1, bool(ssiz & 0x80), ysiz - yo, xsiz - xo, csiz


def _check_rle(frame: bytes, i_frame: int, spp: int, bits: int) -> None:
    if len(frame) < 64:
        raise ImageReadError(f"RLE frame {i_frame} is shorter than its 64-byte header")
    n_seg = int.from_bytes(frame[:4], "little")
    want = spp * max(bits // 8, 1)
    if n_seg != want:
        raise ImageReadError(f"RLE frame {i_frame} has {n_seg} segments, the data set needs {want}")
    offsets = [int.from_bytes(frame[4 + 4 * k : 8 + 4 * k], "little") for k in range(n_seg)]
    if offsets[0] != 64 or any(b <= a for a, b in itertools.pairwise(offsets)) or offsets[-1] >= len(frame):
        raise ImageReadError(
            f"RLE frame {i_frame}: segment offsets {offsets} do not fit its {len(frame)} bytes"
        )


def _check_frame(ts: str, frame: bytes, i: int, ds: Any, out: PixelDataCheck) -> None:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if ts == RLE:
        _check_rle(frame, i, spp, bits)
        return
    body = _strip_padding(frame)
    if ts in J2K_FAMILY:
        precision, signed, h, w, comps = _j2k_header(body, i)
        kind = "JPEG 2000"
        out.signed = signed if out.signed is None else out.signed
    else:
        precision, h, w, comps = _jpeg_header(body, i)
        kind = "JPEG-LS" if ts in JPEGLS else "JPEG"
    if (h and h != rows) or w != cols:
        raise ImageReadError(f"{kind} frame {i} is {h}x{w}, the data set says {rows}x{cols}")
    if comps != spp:
        raise ImageReadError(f"{kind} frame {i} has {comps} components, the data set says {spp} samples")
    if not 1 < precision <= 16 or precision > bits:
        raise ImageReadError(f"{kind} frame {i} has {precision}-bit samples in {bits}-bit storage")
    if not body.endswith(_EOI):
        raise ImageReadError(
            f"{kind} frame {i} is truncated: its stream does not end with an end-of-image marker"
        )
    out.precision = max(out.precision or 0, precision)


def _encapsulated_frames(ds: Any, n_frames: int, ts: str) -> list[bytes]:
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    fp = io.BytesIO(ds.PixelData)
    try:
        bot = parse_basic_offsets(fp)
        fragments = list(generate_fragments(fp))
    except Exception as exc:  # pydicom raises ValueError, struct.error, ... on broken items
        raise ImageReadError(f"encapsulated pixel data is malformed: {exc}") from exc
    if not fragments:
        raise ImageReadError("encapsulated pixel data holds no fragments")
    eot = ds.get("ExtendedOffsetTable")
    if eot is not None and not bot:
        bot = [int.from_bytes(eot[k : k + 8], "little") for k in range(0, len(eot), 8)]
    if bot:
        if len(bot) != n_frames:
            raise ImageReadError(
                f"NumberOfFrames is {n_frames}, the pixel data holds {len(bot)} frames (its offset table)"
            )
        # Group fragments by the offsets (measured from the first fragment's item tag).
        frames: list[bytes] = []
        pos, cur = 0, bytearray()
        starts = set(bot)
        for k, frag in enumerate(fragments):
            if pos in starts and k > 0:
                frames.append(bytes(cur))
                cur = bytearray()
            cur += frag
            pos += 8 + len(frag)
        frames.append(bytes(cur))
    elif ts == RLE:
        frames = fragments  # PS3.5 A.4.2: one fragment per RLE frame
    else:
        frames, cur = [], bytearray()
        for frag in fragments:
            cur += frag
            if _strip_padding(frag).endswith(_EOI):
                frames.append(bytes(cur))
                cur = bytearray()
        if cur:
            frames.append(bytes(cur))  # a last frame without its end marker: truncated
    if len(frames) != n_frames:
        raise ImageReadError(f"NumberOfFrames is {n_frames}, the pixel data holds {len(frames)} frames")
    return frames


def check_pixel_data(ds: Any) -> PixelDataCheck:
    """Check the frame count and every compressed frame's stream; raise ImageReadError naming
    the first disagreement. Returns the frame count and the streams' sample precision."""
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(f"NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number") from exc
    if n_frames < 1:
        raise ImageReadError(f"NumberOfFrames is {n_frames}")
    out = PixelDataCheck(n_frames=n_frames)
    if "PixelData" not in ds:
        return out  # imageio names the missing element
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts in JPEG_FAMILY or ts in JPEGLS or ts in J2K_FAMILY or ts == RLE:
        for i, frame in enumerate(_encapsulated_frames(ds, n_frames, ts)):
            _check_frame(ts, frame, i, ds, out)
        return out
    from pydicom.pixels.utils import get_expected_length

    expected = get_expected_length(ds, unit="bytes")
    actual = len(ds.PixelData)
    if actual < expected or actual > expected + 1:
        per_frame = max(expected // n_frames, 1)
        held = actual / per_frame
        raise ImageReadError(
            f"NumberOfFrames is {n_frames} ({expected} bytes), the pixel data holds {actual} bytes "
            f"({held:.4g} frames)"
        )
    return out
