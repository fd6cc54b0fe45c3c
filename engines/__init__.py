"""Inference back ends behind one Engine interface, plus ONNX export and the engine cache.

Heavy back ends (ONNX Runtime, torch.compile, TensorRT) are imported only when selected.
"""

from .base import Engine, EngineError
from .select import ENGINE_CHOICES, EngineOptions, create_engine
from .torch_engine import TorchEngine

__all__ = ["ENGINE_CHOICES", "Engine", "EngineError", "EngineOptions", "TorchEngine", "create_engine"]
