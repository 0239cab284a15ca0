"""Lumen: a zero-terminal-SNR diffusion inference engine (Lin et al., arXiv:2305.08891).

    import lumen

    eng = lumen.build("default")  # a built-in name, a UNet, a pipeline or a local folder
    image = eng.run(prompt="a white circle on a solid black background").images[0]

`from lumen import engine; engine.build(...)` is the same call. The packages: lumen.engine (the
runtime), lumen.kernels (fused Triton steps), lumen.export (onnxruntime and TensorRT),
lumen.serve (the HTTP server and Ray Serve) and lumen.benchmarks; lumen.cli is the command line.
"""
from ._checkout import leave_checkout_root

leave_checkout_root()  # before anything imports transformers, which imports `kernels`

from .engine import (PRESETS, BackendUnavailableError, Engine, GraphCaptureError,  # noqa: E402
                     InvalidInputError, InvalidTypeError, LumenError, NonFiniteOutputError,
                     SamplerConfig, build)

__all__ = ["build", "Engine", "SamplerConfig", "PRESETS", "LumenError", "InvalidInputError",
           "InvalidTypeError", "BackendUnavailableError", "GraphCaptureError",
           "NonFiniteOutputError"]
