"""onnxruntime runner: CPU EP; CUDA EP with IOBinding on torch CUDA tensors; TensorRT EP as option.

runner(sample, timestep, encoder_hidden_states, **added) -> Tensor shaped like sample, where
timestep is a 0-dim float32 tensor and added holds SDXL's text_embeds / time_ids.
"""
from pathlib import Path

import numpy as np
import torch

from lumen.engine.errors import BackendUnavailableError, InvalidInputError
from lumen.engine.validation import check_choice

from .onnx_export import OUTPUT, UNetSignature

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}
_EP = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
       "tensorrt": "TensorrtExecutionProvider"}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            "backend 'onnxruntime' needs the onnxruntime package (pip install onnxruntime, or "
            "onnxruntime-gpu for CUDA); fallback: backend 'torch'") from e
    return onnxruntime


def providers_for(device: torch.device, provider: str, trt_cache_dir: Path | None) -> list:
    """Execution providers in priority order; raises if the one asked for is not installed."""
    ort = import_onnxruntime()
    check_choice("provider", provider, PROVIDERS)
    if provider == "auto":
        provider = "cuda" if device.type == "cuda" else "cpu"
    if (device.type == "cuda") == (provider == "cpu"):
        raise InvalidInputError(f"provider={provider!r} cannot run on device {device}; expected "
                                f"'cpu' for a CPU device, 'cuda' or 'tensorrt' for a CUDA device")
    available = ort.get_available_providers()
    if _EP[provider] not in available:
        raise BackendUnavailableError(
            f"onnxruntime has no {_EP[provider]} here (available: {', '.join(available)}); "
            f"install onnxruntime-gpu for CUDA, or fall back to backend 'torch'"
            + (" or provider 'cuda'" if provider == "tensorrt" else ""))
    index = device.index or 0
    cuda = ("CUDAExecutionProvider", {"device_id": index})
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return [cuda]
    trt_options = {"device_id": index, "trt_engine_cache_enable": True,
                   "trt_timing_cache_enable": True,
                   "trt_engine_cache_path": str(trt_cache_dir or Path.cwd())}
    return [("TensorrtExecutionProvider", trt_options), cuda]


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _NUMPY:
        raise BackendUnavailableError(
            f"dtype={dtype} on onnxruntime: its CPU and CUDA kernels have no bfloat16 Conv/Gemm; "
            f"use float16 or float32, or backend 'tensorrt' or 'torch'")


def make_session(onnx_path: Path, device: torch.device, dtype: torch.dtype, provider: str = "auto",
                 trt_cache_dir: Path | None = None):
    """An InferenceSession of the graph at onnx_path on the device's providers, fully optimised."""
    ort = import_onnxruntime()
    check_dtype(dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=options,
                                providers=providers_for(device, provider, trt_cache_dir))


def run_session(session, feeds: dict[str, torch.Tensor], output_names: list[str], outputs_like,
                device: torch.device) -> list[torch.Tensor]:
    """The session's outputs for feeds, as tensors on device: a host round trip on CPU; on CUDA
    the session reads the feeds and writes into outputs_like()'s tensors directly (IOBinding).
    ORT runs on its own stream, so the inputs must be ready first (one sync per call); Run
    returns once the outputs are written."""
    if device.type != "cuda":
        arrays = {name: t.detach().to("cpu").contiguous().numpy() for name, t in feeds.items()}
        return [torch.from_numpy(o).to(device) for o in session.run(list(output_names), arrays)]
    binding = session.io_binding()
    index = device.index or 0
    keep = {name: t.contiguous() for name, t in feeds.items()}
    for name, t in keep.items():
        binding.bind_input(name, "cuda", index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
    outs = outputs_like()
    for name, out in zip(output_names, outs):
        binding.bind_output(name, "cuda", index, _NUMPY[out.dtype], tuple(out.shape), out.data_ptr())
    torch.cuda.current_stream(device).synchronize()
    session.run_with_iobinding(binding)
    return outs


class OrtRunner:
    """One InferenceSession; host round trip on CPU, zero-copy IOBinding on CUDA."""

    def __init__(self, onnx_path: Path, signature: UNetSignature, *, device: torch.device,
                 dtype: torch.dtype, provider: str = "auto", trt_cache_dir: Path | None = None):
        self.signature, self.device, self.dtype = signature, device, dtype
        self.session = make_session(onnx_path, device, dtype, provider, trt_cache_dir)

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, down=None, mid=None,
                 **added: torch.Tensor) -> torch.Tensor:
        added = {**added, **self.signature.residual_feeds(sample, down, mid)}
        self.signature.check_call(sample, encoder_hidden_states, added, self.dtype)
        feeds = {"sample": sample, "timestep": timestep.to(torch.float32),
                 "encoder_hidden_states": encoder_hidden_states, **added}
        (out,) = run_session(self.session, feeds, [OUTPUT],
                             lambda: [self.signature.output_like(sample)], sample.device)
        return out
