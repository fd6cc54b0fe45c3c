"""atheris: raw bytes split into message parts -> ``bridge.protocol.decode_message``.

The input is read as parts (``harness.split_parts``: a 2-byte length, then the part), so one
input is one multipart ZeroMQ message as a subscriber receives it. Contract: a message whose
masks (and preview image) have the header's mask shape as uint8, or ``ProtocolError``.

    .venv/bin/python fuzz/fuzz_wire.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["bridge"]):
    import numpy as np

    from bridge.protocol import MaskMessage, PromptResult, ProtocolError, decode_message, encode_message

import harness


def test_one_input(data: bytes) -> None:
    try:
        msg = decode_message(harness.split_parts(data))
    except ProtocolError as exc:
        if not str(exc):
            raise AssertionError("ProtocolError without a message") from exc
        return
    for p in msg.prompts:
        if p.mask.shape != msg.mask_shape or p.mask.dtype != np.uint8:
            raise AssertionError(f"mask {p.mask.shape} {p.mask.dtype} for header shape {msg.mask_shape}")
    if msg.image is not None and msg.image.shape != msg.mask_shape:
        raise AssertionError(f"image {msg.image.shape} for header shape {msg.mask_shape}")


def seeds() -> list[bytes]:
    out = []
    for n_prompts, encoding, image, downsample in [
        (0, "u8", False, 1),
        (1, "bits", True, 2),
        (3, "u8", True, 1),
    ]:
        h, w = 12 // downsample, 16 // downsample
        mask = np.zeros((h, w), np.uint8)
        mask[1:3, 2:5] = 1
        msg = MaskMessage(
            stream="carm0",
            frame_id=3,
            seq=7,
            timestamps_ns={"received": 1, "published": 2},
            source={"source": "dicom", "SOPInstanceUID": "1.2.3"},
            geometry={"ImagerPixelSpacing": [0.3, 0.3]},
            source_shape=(12, 16),
            downsample=downsample,
            encoding=encoding,
            prompts=[PromptResult(f"p{i}", f"t{i}", 0.5, True, mask) for i in range(n_prompts)],
            image=np.full((h, w), 9, np.uint8) if image else None,
            model="fuzz",
        )
        parts = [bytes(f) if isinstance(f, bytes) else np.asarray(f).tobytes() for f in encode_message(msg)]
        out.append(harness.join_parts(parts))
    return out


if __name__ == "__main__":
    harness.quiet()
    harness.run("wire", test_one_input, seeds())
    sys.exit(0)
