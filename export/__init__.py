"""UNet runners on onnxruntime and TensorRT, exported and built through a verified cache.

A runner is runner(sample, timestep, encoder_hidden_states, **added) -> Tensor, the same contract
as the torch backend `lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample`; `added` holds
SDXL's text_embeds and time_ids.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lumen.engine.validation import check_choice

from .cache import ArtifactCache, entry_size
from .onnx_export import EXPORTERS, UNetSignature, export_cached
from .progress import Progress
from .trt_backend import Profile, Shape

BACKENDS = ("onnxruntime", "tensorrt")
Runner = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Artifact:
    """What a build produced: the file a runner loads, its entry's size, and whether it was cached."""

    backend: str
    path: Path
    bytes: int
    cache_hit: bool
    profile: Profile
    signature: UNetSignature


def default_profile(unet: torch.nn.Module, min_shape: Shape | None, opt_shape: Shape | None,
                    max_shape: Shape | None) -> Profile:
    """Missing shapes default to opt, and opt to (2, sample_size, sample_size): CFG's batch."""
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    opt = tuple(opt_shape) if opt_shape is not None else (2, size, size)
    profile = Profile(tuple(min_shape or opt), opt, tuple(max_shape or opt))  # type: ignore[arg-type]
    profile.check_multiple(UNetSignature.of(unet.config).multiple)
    return profile


def build(unet: torch.nn.Module, backend: str, *, device: str | torch.device, dtype: torch.dtype,
          cache_dir: str | Path | None = None, min_shape: Shape | None = None,
          opt_shape: Shape | None = None, max_shape: Shape | None = None,
          exporter: str = "torchscript", optimization_level: int = 3,
          progress: Progress | None = None, loras: tuple = (), residuals: bool = False) -> Artifact:
    """Export (and for TensorRT build) through the cache; returns the artifact to load.

    loras: provenance (file sha256, scale) of LoRAs fused into unet, recorded in the key.
    residuals: the UNet graph (and the TensorRT engine) also takes ControlNet residuals.
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("exporter", exporter, EXPORTERS)
    device = torch.device(device)
    if backend == "tensorrt":
        from .trt_backend import check_available

        check_available(device)  # before minutes of export
    signature = UNetSignature.of(unet.config, residuals)
    profile = default_profile(unet, min_shape, opt_shape, max_shape)
    cache = ArtifactCache(cache_dir)
    onnx_path, hit = export_cached(unet, cache, dtype=dtype, exporter=exporter, progress=progress,
                                   loras=loras, residuals=residuals)
    path = onnx_path
    if backend == "tensorrt":
        from .trt_backend import build_cached

        path, hit = build_cached(onnx_path, cache.digest(onnx_path.parent.name), cache, profile,
                                 signature, device=device, optimization_level=optimization_level,
                                 progress=progress)
    return Artifact(backend, path, entry_size(path.parent), hit, profile, signature)


def load_runner(unet: torch.nn.Module, backend: str, *, device: str | torch.device,
                dtype: torch.dtype, cache_dir: str | Path | None = None,
                min_shape: Shape | None = None, opt_shape: Shape | None = None,
                max_shape: Shape | None = None, exporter: str = "torchscript",
                provider: str = "auto", progress: Progress | None = None,
                loras: tuple = (), residuals: bool = False, optimization_level: int = 3) -> Runner:
    """A runner for backend, exporting/building on a cache miss.

    Shapes are latent (batch, height, width). For TensorRT they are the optimization profile;
    onnxruntime runs any multiple of 2^downsamplers, and only validates them. provider picks
    onnxruntime's execution provider: auto (CPU or CUDA by device), cpu, cuda or tensorrt.
    loras: provenance of LoRAs fused into unet (engine.lora), kept in the cache key.
    residuals: the UNet takes ControlNet residuals (down=, mid=; zeros when not given).
    optimization_level: the TensorRT builder's (0-5).
    """
    device = torch.device(device)
    if backend == "onnxruntime":
        from .ort_backend import check_dtype, providers_for

        check_dtype(dtype)  # before minutes of export
        providers_for(device, provider, None)
    artifact = build(unet, backend, device=device, dtype=dtype, cache_dir=cache_dir,
                     min_shape=min_shape, opt_shape=opt_shape, max_shape=max_shape,
                     exporter=exporter, progress=progress, loras=loras, residuals=residuals,
                     optimization_level=optimization_level)
    if backend == "onnxruntime":
        from .ort_backend import OrtRunner

        return OrtRunner(artifact.path, artifact.signature, device=device, dtype=dtype,
                         provider=provider,
                         trt_cache_dir=ArtifactCache(cache_dir).root / "ort-tensorrt")
    from .trt_backend import TrtRunner

    return TrtRunner(artifact.path, artifact.profile, artifact.signature, device, dtype)


__all__ = ["BACKENDS", "Artifact", "Profile", "build", "load_runner"]
