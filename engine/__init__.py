"""Lumen: a zero-terminal-SNR diffusion inference engine (Lin et al., arXiv:2305.08891)."""
from .config import PRESETS, SamplerConfig
from .errors import BackendUnavailableError, InvalidInputError, InvalidTypeError, LumenError
