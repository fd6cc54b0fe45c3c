"""Where frames come from: a C-arm's video out, DICOM C-STORE, or a replayed recording.

Every source yields the same :class:`Frame`, so the pipeline never knows which one it runs on.
"""

from .base import Frame, FrameSink, Source, SourceError
from .factory import create_source

__all__ = ["Frame", "FrameSink", "Source", "SourceError", "create_source"]
