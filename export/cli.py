"""`lumen build MODEL --backend onnxruntime|tensorrt --min/--opt/--max BxHxW [--controlnet ...]`.

Shapes on the command line are image pixels (batch x height x width), divided by the VAE's scale
factor (the model's VAE, or 1 for a pixel-space model) into the latent profile the engine is built for.
"""
import argparse
from pathlib import Path

import torch

from lumen.engine.cli import add_lora_argument
from lumen.engine.errors import InvalidInputError

from . import BACKENDS, build
from .controlnet_export import build_controlnet, check_dtype
from .onnx_export import DTYPES, EXPORTERS
from .progress import Progress


def parse_shape(text: str) -> tuple[int, int, int]:
    """'2x512x768' -> (2, 512, 768)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}; expected BxHxW with positive ints, "
                                         f"e.g. 2x512x512")
    return int(parts[0]), int(parts[1]), int(parts[2])


def add_build_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build", help="export the UNet to ONNX (and build a TensorRT engine) into the cache")
    parser.add_argument("model",
                        help="built-in model name, or a local diffusers folder (pipeline, unet/, or UNet)")
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float16",
                        help="precision baked into the ONNX graph (default float16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--min", type=parse_shape, help="smallest batch x image height x width")
    parser.add_argument("--opt", type=parse_shape, help="shape TensorRT tunes for")
    parser.add_argument("--max", type=parse_shape, help="largest batch x image height x width")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                        help="TensorRT builder optimization level (default 3)")
    parser.add_argument("--cache-dir", type=Path,
                        help="artifact cache (default $LUMEN_CACHE_DIR or ~/.cache/lumen)")
    add_lora_argument(parser)
    parser.add_argument("--controlnet", nargs="+", default=None, metavar="FOLDER",
                        help="local ControlNet folders: the UNet is built with residual inputs "
                             "and each ControlNet beside it, as engine.build(controlnet=...) "
                             "builds them (a model folder with a controlnet/ brings its own)")
    parser.set_defaults(func=run_build)
    return parser


def run_build(args: argparse.Namespace) -> int:
    if args.backend == "tensorrt":
        from .trt_backend import check_available

        check_available(torch.device(args.device))  # before loading gigabytes of weights
    progress = Progress()
    from lumen.engine.models import load_components

    with progress.phase(f"loading {args.model}"):
        # built-in names and local folders, never a hub; LoRAs fused as engine.build fuses them
        components = load_components(args.model, lora=args.lora, controlnet=args.controlnet)
    latent = {name: to_latent(getattr(args, name), components.vae_scale_factor)
              for name in ("min", "opt", "max")}
    dtype = DTYPES[args.dtype]
    if components.controlnets:
        check_dtype(dtype)
    unet = components.unet.to(args.device, dtype).eval()  # traced where it runs (CUDA for TensorRT)
    artifact = build(unet, args.backend, device=args.device, dtype=dtype,
                     cache_dir=args.cache_dir, min_shape=latent["min"],
                     opt_shape=latent["opt"], max_shape=latent["max"], exporter=args.exporter,
                     optimization_level=args.optimization_level, progress=progress,
                     loras=components.loras, residuals=bool(components.controlnets))
    state = "cache hit" if artifact.cache_hit else "built"
    progress.note(f"{args.backend} artifact ({state}): {artifact.path}")
    progress.note(f"entry size: {artifact.bytes / 2**20:.1f} MiB; "
                  f"profile: {artifact.profile.describe()}")
    for j, net in enumerate(components.controlnets):
        net = net.to(args.device, dtype).eval()
        control = build_controlnet(net, args.backend, device=args.device,
                                   dtype=dtype, cache_dir=args.cache_dir,
                                   profile=artifact.profile,
                                   optimization_level=args.optimization_level, progress=progress)
        state = "cache hit" if control.cache_hit else "built"
        progress.note(f"ControlNet {j} {args.backend} artifact ({state}): {control.path}")
    return 0


def to_latent(shape: tuple[int, int, int] | None, factor: int) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    batch, height, width = shape
    if height % factor or width % factor:
        raise InvalidInputError(f"image size {height}x{width} is not a multiple of the VAE "
                                f"factor {factor}")
    return batch, height // factor, width // factor
