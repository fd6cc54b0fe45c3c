"""Inference back ends behind one Engine interface, plus ONNX export and the engine cache.

Heavy back ends (ONNX Runtime, torch.compile, TensorRT) are imported only when selected.
"""

from .base import Engine, EngineError
from .chain import EngineChain, EngineRunError, NonFiniteOutput
from .select import ENGINE_CHOICES, EngineOptions, EngineSettings, create_engine
from .torch_engine import TorchEngine

__all__ = [
    "ENGINE_CHOICES",
    "Engine",
    "EngineChain",
    "EngineError",
    "EngineOptions",
    "EngineRunError",
    "EngineSettings",
    "NonFiniteOutput",
    "TorchEngine",
    "create_engine",
]
