"""ControlNets on onnxruntime: each exported to its own ONNX graph through the verified cache,
run beside a UNet exported with residual inputs (onnx_export: down_0 .., mid), as the
TensorRT demo runs them.

The graph computes the residuals at conditioning scale 1 without guess mode; the runner applies
the scale (and guess mode's logspace weights) after it with the same operations diffusers'
ControlNetModel does, so the scale is an input, not part of the graph.
"""
import time
from pathlib import Path

import torch

from lumen.engine.errors import InvalidInputError

from .cache import ArtifactCache, key_of, weights_sha256
from .onnx_export import (DTYPE_NAMES, OPSETS, _quiet_exporter, check_export_args,
                          residual_shapes)
from .progress import Progress

CONTROL_FILE = "controlnet.onnx"
EXPORT_FORMAT = 1  # bump whenever this module changes the graph it writes


def cond_factor(config) -> int:
    """Pixels of the control image per latent cell: its embedding's stride-2 convolutions."""
    return 2 ** (len(config.conditioning_embedding_out_channels) - 1)


def names_of(config) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(input names, output names) of a ControlNet's graph."""
    added = ("text_embeds", "time_ids") if config.addition_embed_type == "text_time" else ()
    outputs = tuple(f"down_{i}" for i in range(len(residual_shapes(config)) - 1)) + ("mid",)
    return ("sample", "timestep", "encoder_hidden_states", "controlnet_cond") + added, outputs


class _ControlForward(torch.nn.Module):
    """A ControlNet with positional inputs and its residuals as outputs, at scale 1."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.sdxl = net, net.config.addition_embed_type == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, *added):
        extra = {"text_embeds": added[0], "time_ids": added[1]} if self.sdxl else None
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=1.0,
                             guess_mode=False, added_cond_kwargs=extra, return_dict=False)
        return (*down, mid)


def example(net, dtype: torch.dtype, batch: int = 2) -> dict[str, torch.Tensor]:
    config = net.config
    multiple = 2 ** (len(config.block_out_channels) - 1)
    h = w = 2 * multiple
    f = cond_factor(config)
    inputs = {"sample": torch.randn(batch, config.in_channels, h, w, dtype=dtype),
              "timestep": torch.tensor(999.0),
              "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, dtype=dtype),
              "controlnet_cond": torch.rand(batch, config.conditioning_channels, h * f, w * f,
                                            dtype=dtype)}
    if config.addition_embed_type == "text_time":
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, width, dtype=dtype)
        inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, dtype=dtype)
    return inputs


def export_controlnet(net, path: Path, *, dtype: torch.dtype, exporter: str = "torchscript") -> float:
    """Write a ControlNet's graph to path, check it; returns export seconds."""
    check_export_args(net, dtype, exporter)
    if exporter != "torchscript":
        raise InvalidInputError(f"exporter={exporter!r} for a ControlNet; expected 'torchscript'")
    device = next(net.parameters()).device
    inputs = {k: v.to(device) for k, v in example(net, dtype).items()}
    input_names, output_names = names_of(net.config)
    axes = {"sample": {0: "batch", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "controlnet_cond": {0: "batch", 2: "pixel_height", 3: "pixel_width"}}
    for name in input_names[4:]:
        axes[name] = {0: "batch"}
    for name in output_names:
        axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(_ControlForward(net).eval(), tuple(inputs.values()), str(path),
                          dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes,
                          opset_version=OPSETS["torchscript"], do_constant_folding=True)
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    return time.perf_counter() - start


def key_fields(net, dtype: torch.dtype) -> dict:
    import diffusers
    import onnx

    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    return {"artifact": "onnx-controlnet", "weights_sha256": weights_sha256(net), "config": config,
            "dtype": str(dtype), "exporter": "torchscript", "opset": OPSETS["torchscript"],
            "torch": torch.__version__, "onnx": onnx.__version__,
            "diffusers": diffusers.__version__, "export_format": EXPORT_FORMAT}


def export_cached(net, cache: ArtifactCache, *, dtype: torch.dtype,
                  progress: Progress | None = None) -> Path:
    """The cached controlnet.onnx of net, exported on a miss."""
    phase = (progress or Progress(enabled=False)).phase
    check_export_args(net, dtype, "torchscript")
    with phase("hashing ControlNet weights"):
        fields = key_fields(net, dtype)

    def build(staging: Path) -> None:
        with phase(f"exporting the ControlNet to ONNX ({DTYPE_NAMES[dtype]})"):
            export_controlnet(net, staging / CONTROL_FILE, dtype=dtype)

    found = cache.find(key_of(fields), fields)
    if found is None:
        found, _ = cache.get_or_build(fields, build)
    return found / CONTROL_FILE


class OrtControlNet:
    """A ControlNet on onnxruntime, called as diffusers' ControlNetModel is at scale 1 without
    guess mode (controlnet.run calls every ControlNet so, then weights the residual levels);
    `config` is the module's."""

    def __init__(self, path: Path, config, *, device: torch.device, dtype: torch.dtype,
                 provider: str = "auto"):
        from .ort_backend import make_session

        self.config, self.device, self.dtype = config, device, dtype
        self.input_names, self.output_names = names_of(config)
        self.shapes = residual_shapes(config)
        self.session = make_session(path, device, dtype, provider)

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                 conditioning_scale=1.0, guess_mode: bool = False, added_cond_kwargs=None,
                 return_dict: bool = False):
        if timestep.ndim:
            raise InvalidInputError(f"timestep of shape {tuple(timestep.shape)}; the exported "
                                    "ControlNet takes one timestep per call")
        feeds = {"sample": sample, "timestep": timestep.to(torch.float32),
                 "encoder_hidden_states": encoder_hidden_states,
                 "controlnet_cond": controlnet_cond.to(self.dtype), **(added_cond_kwargs or {})}
        if guess_mode or not isinstance(conditioning_scale, (int, float)) or conditioning_scale != 1:
            raise InvalidInputError(f"conditioning_scale={conditioning_scale!r}, guess_mode="
                                    f"{guess_mode!r} on an exported ControlNet; expected 1.0 and "
                                    "False: controlnet.run weights the residual levels")
        outs = self._run(feeds, sample)  # the graph: ControlNetModel at scale 1, no guess mode
        return outs[:-1], outs[-1]

    def _run(self, feeds: dict, sample: torch.Tensor) -> list[torch.Tensor]:
        from .ort_backend import run_session

        B, _, H, W = sample.shape
        return run_session(self.session, {n: feeds[n] for n in self.input_names}, self.output_names,
                           lambda: [sample.new_empty(B, c, H // f, W // f) for c, f in self.shapes],
                           sample.device)


def load_controlnet_runner(net, *, device, dtype: torch.dtype, cache_dir=None,
                           provider: str = "auto", progress: Progress | None = None) -> OrtControlNet:
    """A ControlNet on onnxruntime, exported through the cache on a miss."""
    device = torch.device(device)
    path = export_cached(net, ArtifactCache(cache_dir), dtype=dtype, progress=progress)
    return OrtControlNet(path, net.config, device=device, dtype=dtype, provider=provider)
