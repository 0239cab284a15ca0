"""Export a diffusers UNet2DConditionModel to ONNX with dynamic batch, height, width and sequence.

Exporter choice, measured by `python -m lumen.benchmarks.bench_backends --exporters` (small UNet,
1M params, CPU, batch 2, 32x32 latents, fp32): TorchScript 6.4 s, max |ONNX - torch| 2.6e-6;
dynamo 62.9 s, 2.7e-6. Same accuracy, ~10x faster export, so TorchScript is the default, even
though torch >= 2.9 deprecates it. dynamo is kept as an option because it is the only one that
writes bfloat16 (opset 23: ONNX Conv has no bfloat16 before opset 22, and the TorchScript
exporter stops at opset 20), so dtype=bfloat16 requires exporter="dynamo".
"""
import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lumen.engine.errors import InvalidInputError, InvalidTypeError
from lumen.engine.validation import check_choice

from .cache import ArtifactCache, key_of, weights_sha256
from .progress import Progress

EXPORTERS = ("torchscript", "dynamo")
OPSETS = {"torchscript": 17, "dynamo": 23}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ONNX_FILE = "unet.onnx"
OUTPUT = "out_sample"
# protobuf caps a message at 2 GiB; keep a margin for the graph itself.
_EXTERNAL_ABOVE = (2 << 30) - (128 << 20)


@dataclass(frozen=True)
class UNetSignature:
    """What the runner feeds the UNet, read from its config."""

    in_channels: int
    cross_attention_dim: int
    multiple: int                    # latent H, W must be multiples of 2^(downsamplers)
    text_embeds_dim: int | None      # SDXL addition_embed_type="text_time"
    time_ids_dim: int | None
    out_channels: int = 0  # 0: same as in_channels
    # ControlNet residual inputs down_0.., mid: (channels, downscale) each; () without
    residuals: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, config, residuals: bool = False) -> "UNetSignature":
        cross = config.cross_attention_dim
        if not isinstance(cross, int):
            raise InvalidInputError(f"cross_attention_dim={cross!r}; ONNX export expects one int")
        text_dim = time_dim = None
        if config.addition_embed_type == "text_time":
            time_dim = 6  # SDXL: original size, crop top-left, target size
            text_dim = config.projection_class_embeddings_input_dim - time_dim * config.addition_time_embed_dim
        return cls(config.in_channels, cross, 2 ** (len(config.block_out_channels) - 1),
                   text_dim, time_dim, getattr(config, "out_channels", 0) or 0,  # a ControlNet has none
                   residual_shapes(config) if residuals else ())

    def output_like(self, sample: torch.Tensor) -> torch.Tensor:
        """An empty UNet output for sample [B, in_channels, H, W]: [B, out_channels, H, W]."""
        B, _, H, W = sample.shape
        return sample.new_empty(B, self.out_channels or self.in_channels, H, W)

    @property
    def added_names(self) -> tuple[str, ...]:
        return ("text_embeds", "time_ids") if self.text_embeds_dim is not None else ()

    @property
    def residual_names(self) -> tuple[str, ...]:
        """down_0 .. down_{K-1}, mid: the ControlNet residual inputs (none without)."""
        if not self.residuals:
            return ()
        return tuple(f"down_{i}" for i in range(len(self.residuals) - 1)) + ("mid",)

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("sample", "timestep", "encoder_hidden_states") + self.added_names + \
            self.residual_names

    def residual_feeds(self, sample: torch.Tensor, down, mid) -> dict[str, torch.Tensor]:
        """The graph's ControlNet residual inputs: the given ones, or zeros when a request has
        no control; a graph exported without them refuses them."""
        if not self.residuals:
            if down is not None or mid is not None:
                raise InvalidInputError("ControlNet residuals for a UNet exported without "
                                        "residual inputs; build the engine with its controlnet")
            return {}
        if down is None:
            return self.residual_zeros(sample)
        if len(down) + 1 != len(self.residuals):
            raise InvalidInputError(f"{len(down)} down residuals; this UNet takes "
                                    f"{len(self.residuals) - 1}")
        return dict(zip(self.residual_names, [*down, mid]))

    def residual_zeros(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero residuals for sample [B, C, H, W] (a request without control)."""
        B, _, H, W = sample.shape
        return {name: sample.new_zeros(B, c, H // f, W // f)
                for name, (c, f) in zip(self.residual_names, self.residuals)}

    def input_shapes(self, batch: int, height: int, width: int, seq: int) -> dict[str, tuple[int, ...]]:
        """Every input's full shape but the 0-dim timestep's, for latents [batch, ., height, width]
        and seq text tokens: what a TensorRT profile sets (trt_backend.Profile)."""
        shapes = {"sample": (batch, self.in_channels, height, width),
                  "encoder_hidden_states": (batch, seq, self.cross_attention_dim)}
        if self.text_embeds_dim is not None and self.time_ids_dim is not None:
            shapes["text_embeds"] = (batch, self.text_embeds_dim)
            shapes["time_ids"] = (batch, self.time_ids_dim)
        for name, (c, f) in zip(self.residual_names, self.residuals):  # ControlNet's
            shapes[name] = (batch, c, height // f, width // f)
        return shapes

    def example(self, dtype: torch.dtype, batch: int = 2, height: int | None = None,
                width: int | None = None, seq_len: int = 77) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes, in input_names order: sample [B, C, H, W],
        timestep [], ehs [B, S, D], SDXL's text_embeds and time_ids, the residuals."""
        shapes = self.input_shapes(batch, height or 2 * self.multiple, width or 2 * self.multiple,
                                   seq_len)
        inputs = {name: torch.randn(shape, dtype=dtype) for name, shape in shapes.items()}
        inputs["timestep"] = torch.tensor(999.0)
        if "time_ids" in inputs:  # original size, crop top-left, target size
            inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch, dtype=dtype)
        return {name: inputs[name] for name in self.input_names}

    def check_call(self, sample: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   added: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Raise on inputs the exported graph cannot run: shapes, latent size, dtype."""
        if sample.ndim != 4 or sample.shape[1] != self.in_channels:
            raise InvalidInputError(f"sample of shape {tuple(sample.shape)}; expected "
                                    f"[B, {self.in_channels}, H, W]")
        check_latent_size(sample.shape[2], sample.shape[3], self.multiple)
        if encoder_hidden_states.shape[0] != sample.shape[0]:
            raise InvalidInputError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]}"
                                    f" != sample batch {sample.shape[0]}")
        names = self.added_names + self.residual_names
        missing = set(names) - set(added)
        if missing or set(added) - set(names):
            raise InvalidInputError(f"extra UNet inputs {sorted(added)}; this UNet takes "
                                    f"{list(names)}")
        for name, t in {"sample": sample, "encoder_hidden_states": encoder_hidden_states,
                        **added}.items():
            if t.dtype != dtype:
                raise InvalidInputError(f"{name} dtype {t.dtype}; this runner was built for "
                                        f"{dtype}")


def residual_shapes(config) -> tuple[tuple[int, int], ...]:
    """(channels, downscale) of each skip connection a ControlNet adds to (conv_in's, each down
    block layer's and downsampler's), then the middle block's: the UNet's down path."""
    channels = list(config.block_out_channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    shapes = [(channels[0], 1)]
    for b, c in enumerate(channels):
        shapes += [(c, 2 ** b)] * layers[b]
        if b < len(channels) - 1:
            shapes.append((c, 2 ** (b + 1)))
    return tuple(shapes) + ((channels[-1], 2 ** (len(channels) - 1)),)


def check_latent_size(height: int, width: int, multiple: int) -> None:
    """Non-multiples make diffusers pass upsample_size, a shape-dependent branch the export froze."""
    if height % multiple or width % multiple:
        raise InvalidInputError(
            f"latent size {height}x{width} is not a multiple of {multiple} (2^downsamplers of "
            f"this UNet); the exported graph would fail concatenating skip connections. Use "
            f"latent sizes that are multiples of {multiple} (images: multiples of {8 * multiple} "
            f"with an 8x VAE)")


class _Forward(torch.nn.Module):
    """UNet with positional inputs and a plain tensor output, as the ONNX graph sees it."""

    def __init__(self, unet: torch.nn.Module, sig: UNetSignature):
        super().__init__()
        self.unet, self.sdxl, self.residuals = unet, sig.text_embeds_dim is not None, len(sig.residuals)

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
        rest = rest[2:] if self.sdxl else rest
        down, mid = (list(rest[:-1]), rest[-1]) if self.residuals else (None, None)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def unet_dtype(unet: torch.nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def check_export_args(unet: torch.nn.Module, dtype: torch.dtype, exporter: str) -> None:
    check_choice("exporter", exporter, EXPORTERS)
    if dtype not in DTYPES.values():
        raise InvalidTypeError(f"dtype={dtype}; expected one of {', '.join(DTYPES)}")
    if unet_dtype(unet) != dtype:
        raise InvalidInputError(f"UNet weights are {unet_dtype(unet)} but dtype={dtype}; load "
                                f"the UNet in {dtype} (torch_dtype=...) before exporting")
    if dtype == torch.bfloat16 and exporter != "dynamo":
        raise InvalidInputError(
            "dtype=bfloat16 with exporter='torchscript': the TorchScript exporter stops at "
            "opset 20, where ONNX Conv has no bfloat16 type; use exporter='dynamo' (opset 23) "
            "or dtype float16")


EXPORT_FORMAT = 1  # bump whenever this module changes the graph it writes


def export_onnx(unet: torch.nn.Module, path: Path, *, dtype: torch.dtype,
                exporter: str = "torchscript", opset: int | None = None,
                residuals: bool = False) -> float:
    """Write path (plus path.data when weights exceed 2 GB), check it; returns export seconds.

    residuals: the graph also takes ControlNet residuals (down_0.., mid) to add."""
    check_export_args(unet, dtype, exporter)
    sig = UNetSignature.of(unet.config, residuals)
    device = next(unet.parameters()).device  # trace where the UNet lives (CUDA for TensorRT)
    inputs = {name: t.to(device) for name, t in sig.example(dtype).items()}
    model = _Forward(unet, sig).eval()
    external = sum(p.numel() * p.element_size() for p in unet.parameters()) >= _EXTERNAL_ABOVE
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        if exporter == "torchscript":
            _export_torchscript(model, inputs, sig, path, opset or OPSETS[exporter])
        else:
            _export_dynamo(model, inputs, sig, path, opset or OPSETS[exporter], external)
    if external and exporter == "torchscript":
        _consolidate_external_data(path)
    seconds = time.perf_counter() - start
    import onnx

    # By path: the in-memory checker refuses protos over 2 GB.
    onnx.checker.check_model(str(path), full_check=True)
    return seconds


def _dynamic_axes(sig: UNetSignature) -> dict[str, dict[int, str]]:
    axes = {"sample": {0: "batch", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch", 1: "sequence"},
            OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    for name in sig.added_names:
        axes[name] = {0: "batch"}
    for name in sig.residual_names:
        axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    return axes


def _export_torchscript(model, inputs, sig, path, opset):
    torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=False,
                      input_names=list(sig.input_names), output_names=[OUTPUT],
                      dynamic_axes=_dynamic_axes(sig), opset_version=opset,
                      do_constant_folding=True)


def _export_dynamo(model, inputs, sig, path, opset, external):
    dim = torch.export.Dim
    batch, seq = dim("batch", min=1, max=1024), dim("sequence", min=1, max=4096)
    # H = multiple * blocks: the graph is only valid for multiples (see check_latent_size).
    rows, cols = dim("rows", min=1, max=512), dim("cols", min=1, max=512)
    shapes = {"sample": {0: batch, 2: sig.multiple * rows, 3: sig.multiple * cols},
              "timestep": None, "encoder_hidden_states": {0: batch, 1: seq}}
    for name in sig.added_names:
        shapes[name] = {0: batch}
    for name, (_, f) in zip(sig.residual_names, sig.residuals):
        shapes[name] = {0: batch, 2: sig.multiple // f * rows, 3: sig.multiple // f * cols}
    program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True,
                                input_names=list(sig.input_names), output_names=[OUTPUT],
                                dynamic_shapes=shapes, opset_version=opset)
    program.save(str(path), external_data=external)


def _consolidate_external_data(path: Path) -> None:
    """One path.data file instead of the one-file-per-tensor the TorchScript exporter writes."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    scattered = {ExternalDataInfo(t).location for t in _get_all_tensors(model)
                 if uses_external_data(t)}
    onnx.load_external_data_for_model(model, str(path.parent))
    target = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target, size_threshold=1024)
    for name in scattered - {target}:
        (path.parent / name).unlink()


@contextlib.contextmanager
def _quiet_exporter():
    # TracerWarnings about shape-dependent Python branches are expected (the one that matters is
    # the latent-size branch, guarded by check_latent_size); the deprecation note is ours to own.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def onnx_key_fields(unet: torch.nn.Module, dtype: torch.dtype, exporter: str,
                    opset: int | None = None, loras: tuple = (), residuals: bool = False) -> dict:
    """Everything that determines the ONNX file; private config keys (paths) are left out.

    loras: the fused LoRAs (file sha256, scale). The weights hash already covers them; they are
    kept so that an entry says which LoRAs it holds.

    The graph is diffusers' forward with the UNet's attention processors, traced by this
    module: their versions are part of the key (EXPORT_FORMAT changes with this file's output).
    """
    import diffusers
    import onnx

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    processors = sorted({type(p).__name__ for p in getattr(unet, "attn_processors", {}).values()})
    fields = {"artifact": "onnx", "weights_sha256": weights_sha256(unet), "config": config,
              "dtype": str(dtype), "exporter": exporter, "opset": opset or OPSETS[exporter],
              "torch": torch.__version__, "onnx": onnx.__version__,
              "diffusers": diffusers.__version__, "attn_processors": processors,
              "export_format": EXPORT_FORMAT}
    if loras:  # absent without LoRAs, so that entries made before LoRA support still match
        fields["loras"] = [dict(lora) for lora in loras]
    if residuals:  # absent without, for the same reason
        fields["controlnet_residuals"] = True
    return fields


def export_cached(unet: torch.nn.Module, cache: ArtifactCache, *, dtype: torch.dtype,
                  exporter: str = "torchscript", progress: Progress | None = None,
                  loras: tuple = (), residuals: bool = False) -> tuple[Path, bool]:
    """(path of the cached unet.onnx, cache hit); exports on a miss."""
    check_export_args(unet, dtype, exporter)
    phase = (progress or Progress(enabled=False)).phase
    with phase("hashing UNet weights"):
        fields = onnx_key_fields(unet, dtype, exporter, loras=loras, residuals=residuals)

    def build(staging: Path) -> None:
        with phase(f"exporting ONNX ({exporter}, {DTYPE_NAMES[dtype]})"):
            export_onnx(unet, staging / ONNX_FILE, dtype=dtype, exporter=exporter,
                        residuals=residuals)

    with phase("verifying cache"):
        found = cache.find(key_of(fields), fields)
    if found is not None:
        return found / ONNX_FILE, True
    entry, hit = cache.get_or_build(fields, build)  # under the key's lock: one process exports
    return entry / ONNX_FILE, hit

