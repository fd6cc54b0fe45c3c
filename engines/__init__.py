"""Inference back ends behind one Engine interface, plus ONNX export."""

from .base import Engine, EngineError
from .torch_engine import TorchEngine

__all__ = ["Engine", "EngineError", "TorchEngine"]
