"""Fused Triton kernels for the step between two UNet calls, with torch references as fallback.

`use_triton(x)` is the one dispatch predicate: the Triton kernels for CUDA tensors (or CPU tensors
under TRITON_INTERPRET=1 with LUMEN_KERNELS=triton, as the tests run them), else the references
built from engine.guidance.guide, engine.prediction.to_x0_eps and the DDIM update. Inputs are
checked the same way on both paths. LUMEN_KERNELS=reference forces the references.
"""
from ._common import use_triton
from .guided_step import (guided_step, guided_step_reference, guided_step_triton, guided_x0_eps,
                          guided_x0_eps_reference, guided_x0_eps_triton)

__all__ = ["guided_step", "guided_x0_eps", "use_triton", "guided_step_reference",
           "guided_x0_eps_reference", "guided_step_triton", "guided_x0_eps_triton"]
