"""`lumen generate PROMPT`, and the --lora option that generate, build and serve share."""
import time
from pathlib import Path

from .config import SAMPLERS
from .lora import lora_arg
from .schedules import SPACINGS


def add_generate_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from a prompt")
    p.add_argument("prompt", help="text prompt (the built-in models know a small vocabulary)")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; several images get -0, -1, ...")
    p.add_argument("--model", default="default",
                   help="built-in name (default, flawed) or a local diffusers folder")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="num_inference_steps")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance_scale (1 disables CFG)")
    p.add_argument("--rescale", type=float, default=0.7, help="guidance_rescale phi in [0, 1]")
    p.add_argument("--eta", type=float, default=0.0, help="eta in [0, 1] (ddim, euler_ancestral)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: ddim")
    p.add_argument("--spacing", choices=SPACINGS, default=None, help="default: trailing")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--upscale", type=int, default=1, help="nearest-neighbour factor for viewing small images")
    p.add_argument("--device", default=None)
    p.add_argument("--image", default=None, metavar="IN.png",
                   help="image-to-image: start from this image (its size sets the output's)")
    p.add_argument("--strength", type=float, default=0.8,
                   help="with --image: how much to change it, in (0, 1]; the last "
                        "int(steps * strength) steps run")
    p.add_argument("--mask", default=None, metavar="MASK.png",
                   help="with --image: inpaint where the mask is white, keep where it is black")
    p.add_argument("--cache-interval", type=int, default=1,
                   help="DeepCache: the full UNet every N-th step, its shallow branch between (1: off)")
    p.add_argument("--cache-branch-id", type=int, default=0,
                   help="DeepCache's branch: block = id // 3, layer = id %% 3")
    p.add_argument("--controlnet", nargs="+", default=None, metavar="FOLDER",
                   help="local ControlNet folders (a model folder with a controlnet/ brings its "
                        "own; the built-in default model's is used with --control-image)")
    p.add_argument("--control-image", nargs="+", default=None, metavar="CONTROL.png",
                   help="one control image per ControlNet, at the output size")
    p.add_argument("--control-scale", type=float, nargs="+", default=[1.0],
                   help="controlnet_conditioning_scale: one, or one per ControlNet")
    p.add_argument("--control-start", type=float, nargs="+", default=[0.0],
                   help="control_guidance_start: one, or one per ControlNet")
    p.add_argument("--control-end", type=float, nargs="+", default=[1.0],
                   help="control_guidance_end: one, or one per ControlNet")
    p.add_argument("--guess-mode", action="store_true",
                   help="the ControlNets see the conditional rows only")
    add_lora_argument(p)
    p.set_defaults(func=run_generate)


def add_lora_argument(p) -> None:
    p.add_argument("--lora", type=lora_arg, action="append", default=None, metavar="PATH[:SCALE]",
                   help="LoRA safetensors (diffusers or kohya) fused into the model; repeatable")


def run_generate(args) -> int:
    import torch
    from tqdm import tqdm

    from .runtime import build

    start = time.perf_counter()
    eng = build(args.model, device=args.device, lora=args.lora,
                controlnet=args.controlnet or builtin_controlnet(args.model, args.control_image))
    changes = {k: v for k, v in (("sampler", args.sampler), ("timestep_spacing", args.spacing)) if v}
    if changes:
        eng.config = eng.config.replace(**changes)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    source = read_image(args.image) if args.image else None
    mask = read_image(args.mask, "--mask").convert("L") if args.mask else None
    control = None
    if args.control_image:
        control = [read_image(path, "--control-image") for path in args.control_image]
        control = control[0] if len(control) == 1 else control
    steps = min(int(args.steps * args.strength), args.steps) if source is not None else args.steps
    with tqdm(total=steps, desc="sampling", unit="step") as bar:
        images = eng.run(prompt=args.prompt, negative_prompt=args.negative_prompt,
                         num_inference_steps=args.steps, guidance_scale=args.guidance,
                         guidance_rescale=args.rescale, eta=args.eta, generator=generators,
                         height=args.height, width=args.width, num_images_per_prompt=args.num_images,
                         image=source, strength=args.strength, mask_image=mask,
                         cache_interval=args.cache_interval, cache_branch_id=args.cache_branch_id,
                         control_image=control, controlnet_conditioning_scale=_one(args.control_scale),
                         control_guidance_start=_one(args.control_start),
                         control_guidance_end=_one(args.control_end), guess_mode=args.guess_mode,
                         callback=lambda i: bar.update(1)).images
    for path, image in zip(_output_paths(Path(args.output), len(images)), images):
        if args.upscale > 1:
            image = image.resize((image.width * args.upscale, image.height * args.upscale), 0)
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    ran = f"{steps} of {args.steps} steps (strength {args.strength})" if source else f"{steps} steps"
    print(f"{len(images)} image(s) in {time.perf_counter() - start:.1f} s with {eng.config.sampler}, "
          f"{eng.config.timestep_spacing} spacing, {ran}")
    return 0


def read_image(path: str, option: str = "--image"):
    """The RGB image at path (PNG, JPEG, ... as PIL reads them), or an error naming the path."""
    from PIL import Image, UnidentifiedImageError

    from .errors import InvalidInputError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError) as err:
        raise InvalidInputError(f"{option} {path!r}: {err}; expected an image file") from err


def builtin_controlnet(model: str, control_image) -> str | None:
    """A built-in model's own ControlNet (by the model's name, as build's controlnet= takes it),
    when a control image is given without --controlnet."""
    from . import builtin

    return model if control_image and model in builtin.MODEL_NAMES else None


def _one(values: list):
    """A repeatable option's values: one value as itself, several as a list."""
    return values[0] if len(values) == 1 else values


def _output_paths(path: Path, n: int) -> list[Path]:
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]
