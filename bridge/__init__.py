"""Torch-free client side of the fluorosam-rt mask stream: wire protocol and subscriber.

Depends only on numpy, pyzmq and msgpack, so navigation systems can consume masks without
installing the model stack.
"""

from .aio import AsyncSubscriber
from .protocol import (
    PROTOCOL_VERSION,
    MaskMessage,
    PromptResult,
    ProtocolError,
    ProtocolVersionError,
    decode_message,
    encode_message,
)
from .subscriber import FrameGapError, Subscriber, SubscriberTimeout

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncSubscriber",
    "FrameGapError",
    "MaskMessage",
    "PromptResult",
    "ProtocolError",
    "ProtocolVersionError",
    "Subscriber",
    "SubscriberTimeout",
    "decode_message",
    "encode_message",
]
