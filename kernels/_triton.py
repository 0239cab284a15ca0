"""Triton if installed, else a stub so the torch references (the CPU fallback) still import.

INTERPRETED is read once, here, because `triton.jit` decides at decoration time whether a
kernel is compiled or interpreted (TRITON_INTERPRET=1): it must be set before `kernels` loads.
"""
try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
    INTERPRETED = bool(triton.knobs.runtime.interpret)
except ImportError:  # torch CPU wheels do not ship triton
    import types

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=int)
    HAVE_TRITON = False
    INTERPRETED = False
