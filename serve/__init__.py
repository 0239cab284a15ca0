"""Lumen's HTTP server: OpenAI and AUTOMATIC1111 image APIs with dynamic batching.

`create_app(engine, **limits)` returns the ASGI app (FastAPI) for uvicorn or an embedding
service; `lumen serve` builds an engine, warms it up and serves it; `lumen.serve.ray_app` runs
it as replicas on Ray Serve (`lumen serve --ray`). Names are imported on first use, so `lumen`
runs without the serve extra installed.
"""
import importlib

_EXPORTS = {"create_app": ".app", "Limits": ".app", "Batcher": ".batcher", "BatchKey": ".jobs",
            "Job": ".jobs"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
