"""Lumen: a zero-terminal-SNR diffusion inference engine (Lin et al., arXiv:2305.08891)."""
from .config import PRESETS, SamplerConfig
from .errors import (BackendUnavailableError, InvalidInputError, InvalidTypeError, LumenError,
                     NonFiniteOutputError)
from .graphs import GraphCaptureError
from .runtime import Engine, build

__all__ = ["build", "Engine", "SamplerConfig", "PRESETS", "LumenError", "InvalidInputError",
           "InvalidTypeError", "BackendUnavailableError", "GraphCaptureError", "NonFiniteOutputError"]
