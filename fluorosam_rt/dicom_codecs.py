"""Which DICOM transfer syntaxes the node can decode, and with which decoder.

Why this module exists:

* The Storage SCP must accept exactly what it can decode (and refuse the rest at association
  time, not with 0xC000 after the sender has pushed the pixels). pydicom 3 picks a decoder per
  transfer syntax from the plugins that are importable, so the accepted list is asked from
  pydicom at run time (:func:`decodable_syntaxes`), never written down by hand.
* Decoders are chosen for licence (the project is Apache-2.0), speed and wheels on Linux, macOS
  and Windows: GDCM's wheel ``python-gdcm`` (BSD-3) for the JPEG processes, ``pyjpegls``
  (MIT, CharLS BSD-3) for JPEG-LS, ``pylibjpeg-openjpeg`` (MIT, OpenJPEG BSD-2) for JPEG 2000 and
  HTJ2K, Pillow (MIT-CMU, libjpeg-turbo) for 8-bit JPEG, pydicom itself for RLE, Deflated and
  Big Endian. ``pylibjpeg-libjpeg`` would also do the JPEG processes but is GPL-3.0.
* The plugin order is set here (:data:`PLUGIN_PREFERENCE`) from measured speed
  (``fluorosam-rt bench-decode``): pydicom tries plugins in order and falls back to the next one
  when a plugin fails, so the fastest goes first and the others remain as fallbacks.
* pydicom refuses GDCM for JPEG Extended with 12-bit samples, the usual lossy syntax of 10-16 bit
  X-ray. GDCM decodes it correctly when its 12-bit codec is selected directly (checked against
  dcmtk's ``dcmdjpeg``, tests/test_dicom_syntaxes.py), so :func:`decode_jpeg_gdcm` is a plugin
  that does that, for the JPEG Extended syntax only.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PLUGIN_PREFERENCE",
    "SYNTAXES",
    "SyntaxInfo",
    "decodable_syntaxes",
    "decoder_plugins",
    "install_decoders",
]


@dataclass(frozen=True)
class SyntaxInfo:
    uid: str
    key: str  # short, stable name used by the benchmark, the tests and the conformance statement
    name: str  # the standard's name (PS3.6 Annex A)
    encapsulated: bool
    lossy: bool


# Every transfer syntax that X-ray equipment and archives send and pydicom 3 can decode, in the
# order the conformance statement lists them. MPEG/HEVC video syntaxes are not here: no decoder.
SYNTAXES: tuple[SyntaxInfo, ...] = (
    SyntaxInfo("1.2.840.10008.1.2", "implicit", "Implicit VR Little Endian", False, False),
    SyntaxInfo("1.2.840.10008.1.2.1", "explicit", "Explicit VR Little Endian", False, False),
    SyntaxInfo("1.2.840.10008.1.2.1.99", "deflated", "Deflated Explicit VR Little Endian", False, False),
    SyntaxInfo("1.2.840.10008.1.2.2", "big_endian", "Explicit VR Big Endian (retired)", False, False),
    SyntaxInfo("1.2.840.10008.1.2.4.50", "jpeg_baseline", "JPEG Baseline (Process 1), 8-bit", True, True),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.51", "jpeg_extended", "JPEG Extended (Process 2 and 4), 12-bit", True, True
    ),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.57", "jpeg_lossless", "JPEG Lossless, Non-Hierarchical (Process 14)", True, False
    ),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.70",
        "jpeg_lossless_sv1",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14, Selection Value 1)",
        True,
        False,
    ),
    SyntaxInfo("1.2.840.10008.1.2.4.80", "jpegls_lossless", "JPEG-LS Lossless", True, False),
    SyntaxInfo("1.2.840.10008.1.2.4.81", "jpegls_near_lossless", "JPEG-LS Lossy (Near-Lossless)", True, True),
    SyntaxInfo("1.2.840.10008.1.2.4.90", "j2k_lossless", "JPEG 2000 (Lossless Only)", True, False),
    SyntaxInfo("1.2.840.10008.1.2.4.91", "j2k", "JPEG 2000 (lossless or lossy)", True, True),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.201", "htj2k_lossless", "High-Throughput JPEG 2000 (Lossless Only)", True, False
    ),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.202",
        "htj2k_lossless_rpcl",
        "High-Throughput JPEG 2000 with RPCL Options (Lossless Only)",
        True,
        False,
    ),
    SyntaxInfo(
        "1.2.840.10008.1.2.4.203", "htj2k", "High-Throughput JPEG 2000 (lossless or lossy)", True, True
    ),
    SyntaxInfo("1.2.840.10008.1.2.5", "rle", "RLE Lossless", True, False),
)
SYNTAX_BY_UID = {s.uid: s for s in SYNTAXES}
SYNTAX_BY_KEY = {s.key: s for s in SYNTAXES}
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"

# Plugins in the order pydicom should try them (fastest first, measured by bench-decode on a
# 1024x1024 frame); plugins not named keep pydicom's order after these.
PLUGIN_PREFERENCE: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("pillow", "gdcm"),
    "1.2.840.10008.1.2.4.51": ("gdcm-jpeg", "pillow", "gdcm"),
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "gdcm"),
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "gdcm"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow", "gdcm"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow", "gdcm"),
}

_installed = False
_install_lock = threading.Lock()


def install_decoders() -> None:
    """Add the GDCM JPEG Extended plugin and put pydicom's plugins in preference order (once).

    pydicom's plugin registry is global and not thread-safe, so this runs under a lock before
    anything decodes (imageio calls it on its first DICOM decode, the SCP before it listens).
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        from pydicom.pixels import get_decoder

        ext = get_decoder(JPEG_EXTENDED)
        if "gdcm-jpeg" not in ext.available_plugins:
            with contextlib.suppress(ValueError):  # registered before, as unavailable (no GDCM here)
                ext.add_plugin("gdcm-jpeg", (__name__, "decode_jpeg_gdcm"))
        for uid, order in PLUGIN_PREFERENCE.items():
            dec = get_decoder(uid)
            funcs = dict(dec._available)  # label -> function; reordered through the public API
            ordered = [p for p in order if p in funcs] + [p for p in funcs if p not in order]
            for label in funcs:
                dec.remove_plugin(label)
            for label in ordered:
                fn = funcs[label]
                dec.add_plugin(label, (fn.__module__, fn.__name__))
        _installed = True


def decoder_plugins(uid: str) -> list[str]:
    """The pydicom plugins that can decode ``uid`` here, in the order they are tried.

    Native syntaxes (no compression) need no plugin: ``["pydicom"]``.
    """
    install_decoders()
    from pydicom.pixels import get_decoder

    info = SYNTAX_BY_UID.get(uid)
    if info is None:
        return []
    try:
        dec = get_decoder(uid)
    except NotImplementedError:
        return []
    if not info.encapsulated:
        return ["pydicom"]
    return list(dec._available)  # the order pydicom tries them (available_plugins is sorted)


def decodable_syntaxes() -> list[SyntaxInfo]:
    """The transfer syntaxes some installed plugin decodes: what the SCP accepts."""
    return [s for s in SYNTAXES if decoder_plugins(s.uid)]


# --------------------------------------------------------------------------- the GDCM JPEG plugin

DECODER_DEPENDENCIES = {JPEG_EXTENDED: ("python-gdcm>=3.0.10",)}


def is_available(uid: str) -> bool:
    """pydicom's plugin contract: can this module decode ``uid`` here?"""
    if uid != JPEG_EXTENDED:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _sof_precision(src: bytes) -> int | None:
    """Sample precision P from the first SOF marker of a JPEG stream (None if not found)."""
    i, n = 2, len(src)
    while i + 4 <= n:
        if src[i] != 0xFF:
            return None
        marker = src[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(src[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return src[i + 4] if i + 4 < n else None
        if marker == 0xDA:
            return None
        i += 2 + length
    return None


def decode_jpeg_gdcm(src: bytes, runner: Any) -> bytes:
    """Decode one JPEG Extended frame (8- or 12-bit samples) with GDCM's IJG codecs.

    GDCM picks its 8/12/16-bit IJG codec from the pixel format's Bits Allocated; giving it the
    stream's own sample precision selects the right one at once (with 16 it first fails, prints
    "Unsupported JPEG data precision 12" on stderr and retries). Output: 8-bit samples in bytes,
    12-bit samples in little-endian 16-bit words.
    """
    import gdcm

    precision = _sof_precision(src)
    if precision not in (8, 12):
        raise ValueError(f"JPEG Extended stream has sample precision {precision}, not 8 or 12")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi_type = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi_type))
    if runner.samples_per_pixel > 1:
        img.SetPlanarConfiguration(runner.planar_configuration)
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(JPEG_EXTENDED)))
    bits = min(int(runner.bits_stored), precision)
    img.SetPixelFormat(
        gdcm.PixelFormat(runner.samples_per_pixel, precision, bits, bits - 1, runner.pixel_representation)
    )
    buf = img.GetBuffer()
    if buf is None:
        raise ValueError("GDCM could not decode the JPEG Extended stream")
    runner.set_option("bits_allocated", 8 if precision == 8 else 16)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)  # GDCM returns colour-by-pixel
    return buf.encode("utf-8", "surrogateescape")
