"""fluorosam-rt: a real-time, language-promptable X-ray segmentation node."""

__version__ = "0.1.0"
