"""ControlNets on onnxruntime and TensorRT: each exported to its own ONNX graph through the
verified cache (and built into its own TensorRT engine), run beside a UNet exported with
residual inputs (onnx_export: down_0 .., mid), as the TensorRT demo runs them.

The graph computes the residuals at conditioning scale 1 without guess mode; the runner applies
the scale (and guess mode's logspace weights) after it with the same operations diffusers'
ControlNetModel does, so the scale is an input, not part of the graph.
"""
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lumen.engine.errors import InvalidInputError

from .cache import ArtifactCache, weights_sha256
from .onnx_export import (_EXTERNAL_ABOVE, DTYPE_NAMES, OPSETS, UNetSignature,
                          _consolidate_external_data, _quiet_exporter, check_export_args,
                          check_latent_size)
from .progress import Progress

CONTROL_FILE = "controlnet.onnx"
EXPORT_FORMAT = 1  # bump whenever this module changes the graph it writes


def cond_factor(config) -> int:
    """Pixels of the control image per latent cell: its embedding's stride-2 convolutions."""
    return 2 ** (len(config.conditioning_embedding_out_channels) - 1)


@dataclass(frozen=True)
class ControlSignature:
    """What a ControlNet's graph takes and gives, read from its config: the UNet-side inputs of
    `unet` (a UNet's signature whose residual inputs are the ControlNet's outputs) and the
    control image, `cond_factor` pixels per latent cell."""

    unet: UNetSignature
    cond_channels: int
    cond_factor: int
    pooled: bool = False  # global_pool_conditions: every residual is [B, C, 1, 1]

    @classmethod
    def of(cls, config) -> "ControlSignature":
        return cls(UNetSignature.of(config, residuals=True), config.conditioning_channels,
                   cond_factor(config), bool(getattr(config, "global_pool_conditions", False)))

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("sample", "timestep", "encoder_hidden_states", "controlnet_cond") + \
            self.unet.added_names

    @property
    def output_names(self) -> tuple[str, ...]:
        """down_0 .. down_{K-1}, mid: the residuals, named as the UNet's graph takes them."""
        return self.unet.residual_names

    def input_shapes(self, batch: int, height: int, width: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Every input's full shape but the 0-dim timestep's, for latents [batch, ., height,
        width] and seq text tokens: what a TensorRT profile sets (trt_backend.Profile)."""
        unet = self.unet.input_shapes(batch, height, width, seq)
        shapes = {name: unet[name] for name in self.input_names if name in unet}
        shapes["controlnet_cond"] = (batch, self.cond_channels, height * self.cond_factor,
                                     width * self.cond_factor)
        return shapes

    def residual_shapes(self, sample: torch.Tensor) -> list[tuple[int, ...]]:
        """The residuals' shapes for sample [B, C, H, W] as the UNet's graph takes them, in
        output_names order."""
        batch, _, height, width = sample.shape
        shapes = self.unet.input_shapes(batch, height, width, 1)
        return [shapes[name] for name in self.output_names]

    def outputs_like(self, sample: torch.Tensor) -> list[torch.Tensor]:
        """Empty graph outputs for sample: the residuals, or [B, C, 1, 1] each when pooled."""
        return [sample.new_empty(shape[:2] + (1, 1) if self.pooled else shape)
                for shape in self.residual_shapes(sample)]

    def example(self, dtype: torch.dtype, batch: int = 2) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes, in input_names order (a control image in [0, 1])."""
        inputs = self.unet.example(dtype, batch)
        shape = self.input_shapes(batch, *inputs["sample"].shape[2:], 77)["controlnet_cond"]
        inputs["controlnet_cond"] = torch.rand(shape, dtype=dtype)
        return {name: inputs[name] for name in self.input_names}


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


def check_dtype(dtype: torch.dtype) -> None:
    """Refuse bfloat16 before any export: the ControlNet exports with TorchScript (opset 17),
    whose Conv has no bfloat16 type."""
    if dtype == torch.bfloat16:
        raise InvalidInputError("dtype bfloat16 with an exported ControlNet (backend onnxruntime "
                                "or tensorrt): the ControlNet exports with TorchScript, which has "
                                "no bfloat16 Conv; use float16 or float32, or backend 'torch'")


def export_controlnet(net, path: Path, *, dtype: torch.dtype, exporter: str = "torchscript") -> float:
    """Write a ControlNet's graph to path, check it; returns export seconds."""
    check_export_args(net, dtype, exporter)
    if exporter != "torchscript":
        raise InvalidInputError(f"exporter={exporter!r} for a ControlNet; expected 'torchscript'")
    device = next(net.parameters()).device
    sig = ControlSignature.of(net.config)
    inputs = {k: v.to(device) for k, v in sig.example(dtype).items()}
    input_names, output_names = sig.input_names, sig.output_names
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
    if sum(p.numel() * p.element_size() for p in net.parameters()) >= _EXTERNAL_ABOVE:
        _consolidate_external_data(path)  # one controlnet.onnx.data, as the UNet's
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
                  progress: Progress | None = None) -> tuple[Path, bool]:
    """(the cached controlnet.onnx of net, cache hit), exported on a miss."""
    phase = (progress or Progress(enabled=False)).phase
    check_export_args(net, dtype, "torchscript")
    with phase("hashing ControlNet weights"):
        fields = key_fields(net, dtype)

    def build(staging: Path) -> None:
        with phase(f"exporting the ControlNet to ONNX ({DTYPE_NAMES[dtype]})"):
            export_controlnet(net, staging / CONTROL_FILE, dtype=dtype)

    found, hit = cache.get_or_build(fields, build)
    return found / CONTROL_FILE, hit


class ExportedControlNet:
    """A ControlNet's graph, called as diffusers' ControlNetModel is at scale 1 without guess
    mode (controlnet.run calls every ControlNet so, then weights the residual levels); `config`
    is the module's. Subclasses run the graph (`_run`)."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.signature = ControlSignature.of(config)

    def __call__(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                 conditioning_scale=1.0, guess_mode: bool = False, added_cond_kwargs=None,
                 return_dict: bool = False):
        if timestep.ndim:
            raise InvalidInputError(f"timestep of shape {tuple(timestep.shape)}; the exported "
                                    "ControlNet takes one timestep per call")
        if guess_mode or not isinstance(conditioning_scale, (int, float)) or conditioning_scale != 1:
            raise InvalidInputError(f"conditioning_scale={conditioning_scale!r}, guess_mode="
                                    f"{guess_mode!r} on an exported ControlNet; expected 1.0 and "
                                    "False: controlnet.run weights the residual levels")
        feeds = {"sample": sample, "timestep": timestep.to(torch.float32),
                 "encoder_hidden_states": encoder_hidden_states,
                 "controlnet_cond": controlnet_cond.to(self.dtype), **(added_cond_kwargs or {})}
        self.check(feeds)
        outs = self._run({name: feeds[name] for name in self.signature.input_names}, sample)
        if self.signature.pooled:  # broadcast as the UNet's own addition broadcasts them
            outs = [o.expand(shape) for o, shape in zip(outs, self.signature.residual_shapes(sample))]
        return outs[:-1], outs[-1]

    def check(self, feeds: dict[str, torch.Tensor]) -> None:
        """Raise on inputs the graph cannot run: names, shapes, latent size, dtype."""
        sample, emb = feeds["sample"], feeds["encoder_hidden_states"]
        if sample.ndim != 4 or emb.ndim != 3:
            raise InvalidInputError(f"sample of shape {tuple(sample.shape)} and "
                                    f"encoder_hidden_states of shape {tuple(emb.shape)}; expected "
                                    "[B, C, H, W] and [B, S, D]")
        batch, _, height, width = sample.shape
        check_latent_size(height, width, self.signature.unet.multiple)
        shapes = self.signature.input_shapes(batch, height, width, emb.shape[1])
        if set(feeds) != {"timestep", *shapes}:
            raise InvalidInputError(f"ControlNet inputs {sorted(feeds)}; this ControlNet takes "
                                    f"{list(self.signature.input_names)}")
        for name, shape in shapes.items():
            if tuple(feeds[name].shape) != shape:
                raise InvalidInputError(f"{name} of shape {tuple(feeds[name].shape)}; this "
                                        f"ControlNet takes {shape} for sample "
                                        f"{tuple(sample.shape)}")
            if feeds[name].dtype != self.dtype:
                raise InvalidInputError(f"{name} dtype {feeds[name].dtype}; this ControlNet was "
                                        f"exported for {self.dtype}")

    def _run(self, feeds: dict[str, torch.Tensor], sample: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class OrtControlNet(ExportedControlNet):
    """A ControlNet's graph on onnxruntime."""

    def __init__(self, path: Path, config, *, device: torch.device, dtype: torch.dtype,
                 provider: str = "auto"):
        from .ort_backend import make_session

        super().__init__(config, device, dtype)
        self.session = make_session(path, device, dtype, provider)

    def _run(self, feeds: dict[str, torch.Tensor], sample: torch.Tensor) -> list[torch.Tensor]:
        from .ort_backend import run_session

        return run_session(self.session, feeds, list(self.signature.output_names),
                           lambda: self.signature.outputs_like(sample), sample.device)


def control_profile(profile):
    """The TensorRT profile of a ControlNet beside a UNet built for `profile`: the same latent
    sizes and sequences, and batches from 1 (guess mode runs the conditional half of a CFG
    batch; the step scheduler runs a ControlNet over the rows that use it)."""
    return dataclasses.replace(profile, min=(1, *profile.min[1:]))


@dataclass(frozen=True)
class ControlArtifact:
    """What build_controlnet produced: the file a runner loads (controlnet.onnx, or TensorRT's
    controlnet.plan), whether it was cached, and the TensorRT profile (None on onnxruntime)."""

    path: Path
    cache_hit: bool
    profile: object = None


def build_controlnet(net, backend: str, *, device, dtype: torch.dtype, cache_dir=None,
                     profile=None, optimization_level: int = 3,
                     progress: Progress | None = None) -> ControlArtifact:
    """Export net (and for TensorRT build an engine for control_profile(profile), the UNet
    engine's profile) through the cache."""
    device = torch.device(device)
    if backend == "tensorrt":
        from .trt_backend import check_available

        check_available(device)  # before the export
        if profile is None:
            raise InvalidInputError("a TensorRT ControlNet needs the UNet engine's profile")
    elif backend != "onnxruntime":
        raise InvalidInputError(f"backend={backend!r} for an exported ControlNet; expected "
                                "'onnxruntime' or 'tensorrt'")
    cache = ArtifactCache(cache_dir)
    path, hit = export_cached(net, cache, dtype=dtype, progress=progress)
    if backend == "onnxruntime":
        return ControlArtifact(path, hit)
    from .trt_backend import CONTROL_PLAN_FILE, build_cached

    profile = control_profile(profile)
    plan, hit = build_cached(path, cache.digest(path.parent.name), cache, profile,
                             ControlSignature.of(net.config), device=device,
                             optimization_level=optimization_level, progress=progress,
                             plan_file=CONTROL_PLAN_FILE)
    return ControlArtifact(plan, hit, profile)


def load_controlnet_runner(net, backend: str = "onnxruntime", *, device, dtype: torch.dtype,
                           cache_dir=None, provider: str = "auto", profile=None,
                           optimization_level: int = 3,
                           progress: Progress | None = None) -> ExportedControlNet:
    """A ControlNet on onnxruntime, or on TensorRT beside a UNet engine built for `profile`,
    exported and built through the cache on a miss (build_controlnet)."""
    device = torch.device(device)
    artifact = build_controlnet(net, backend, device=device, dtype=dtype, cache_dir=cache_dir,
                                profile=profile, optimization_level=optimization_level,
                                progress=progress)
    if backend == "onnxruntime":
        return OrtControlNet(artifact.path, net.config, device=device, dtype=dtype,
                             provider=provider)
    from .trt_backend import TrtControlNet, TrtEngine

    engine = TrtEngine(artifact.path, artifact.profile, device, dtype,
                       ControlSignature.of(net.config).output_names)
    return TrtControlNet(engine, net.config)
