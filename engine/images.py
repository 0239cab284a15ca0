"""Image-to-image inputs: pixels in [0, 1] to the latents a run starts from (diffusers' conventions).

`pixels` takes what diffusers' img2img pipelines take (PIL images, numpy HWC arrays, [N, 3, H, W]
tensors in [0, 1], or a list of them) and checks it; `encode` maps pixels to the model's sample
space: the VAE posterior sampled with each image's own generator, times the scaling factor
(diffusers' `retrieve_latents`), or for a pixel-space model the image mapped to [-1, 1]. The
start of the run is then the plan's first listed point: x = a*x0 + s*noise
(docs/math.md#image-to-image).
"""
import numpy as np
import torch

from .errors import InvalidInputError, InvalidTypeError


def pixels(image) -> torch.Tensor:
    """[N, 3, H, W] fp32 in [0, 1] from a PIL image, numpy HWC / NHWC array, [N, 3, H, W] or
    [3, H, W] tensor, or a list of them (of one size)."""
    items = image if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise InvalidInputError("image=[]; expected at least one image")
    tensors = [one_image(item, i) for i, item in enumerate(items)]
    sizes = {tuple(t.shape[2:]) for t in tensors}
    if len(sizes) > 1:
        raise InvalidInputError(f"images of sizes {sorted(sizes)}; expected one size (H, W)")
    out = torch.cat(tensors)
    if not bool(torch.isfinite(out).all()):
        raise InvalidInputError("image contains NaN or inf; expected pixel values in [0, 1]")
    low, high = float(out.min()), float(out.max())
    if low < 0 or high > 1:
        raise InvalidInputError(f"image values in [{low:.3g}, {high:.3g}]; expected [0, 1] "
                                "(diffusers' convention for arrays and tensors)")
    return out


def one_image(item, i: int) -> torch.Tensor:
    """[n, 3, H, W] fp32 of one list item."""
    from PIL import Image

    if isinstance(item, Image.Image):
        item = np.asarray(item.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(item, np.ndarray):
        if item.dtype == np.uint8:
            item = item.astype(np.float32) / 255.0
        if item.ndim == 3:
            item = item[None]
        if item.ndim != 4 or item.shape[-1] != 3:
            raise InvalidInputError(f"image[{i}] array of shape {item.shape}; expected HWC or "
                                    "NHWC with 3 channels")
        item = torch.from_numpy(np.ascontiguousarray(item)).permute(0, 3, 1, 2)
    if not isinstance(item, torch.Tensor):
        raise InvalidTypeError(f"image[{i}] of type {type(item).__name__}; expected a PIL image, "
                               "a numpy array or a torch.Tensor")
    if not item.is_floating_point():
        raise InvalidTypeError(f"image[{i}] of dtype {item.dtype}; expected floats in [0, 1] "
                               "(or a uint8 numpy array)")
    if item.ndim == 3:
        item = item[None]
    if item.ndim != 4 or item.shape[1] != 3:
        raise InvalidInputError(f"image[{i}] of shape {tuple(item.shape)}; expected [N, 3, H, W]")
    return item.detach().float().cpu()


def encode(images: torch.Tensor, components, generators: list, device, dtype,
           signed: bool = False) -> torch.Tensor:
    """x0 [N, C, h, w] fp32 of pixels [N, 3, H, W] in [0, 1] ([-1, 1] when signed): image i's VAE
    posterior sampled with generator i (scaled as diffusers scales it), or the pixels in [-1, 1]
    without a VAE."""
    images = images if signed else images * 2 - 1
    vae = components.vae
    if vae is None:
        return images.to(device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i, g in enumerate(generators):
        x = images[i:i + 1].to(device, components.vae_dtype(dtype))
        with torch.inference_mode():
            dist = vae.encode(x).latent_dist
            z = dist.sample(generator=g)  # drawn where g lives, as diffusers' randn_tensor
        out.append(((z.float() - shift) * vae.config.scaling_factor))
    return torch.cat(out)


def mask_pixels(mask_image, size: tuple[int, int]) -> torch.Tensor:
    """[N, 1, H, W] fp32 in {0, 1} (1 repaints, 0 keeps): grayscale, binarised at 0.5 as
    diffusers' mask processor does; the size must be the image's."""
    from PIL import Image

    items = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("L"), dtype=np.float32) / 255.0
        if isinstance(item, np.ndarray):
            if item.dtype == np.uint8:
                item = item.astype(np.float32) / 255.0
            item = torch.from_numpy(np.ascontiguousarray(item))
            item = item[None, None] if item.ndim == 2 else item.permute(2, 0, 1)[None, :1] \
                if item.ndim == 3 else item
        if not isinstance(item, torch.Tensor) or not item.is_floating_point():
            raise InvalidTypeError(f"mask_image[{i}] of type {type(item).__name__}; expected a "
                                   "PIL image, a numpy array or a float torch.Tensor")
        if item.ndim == 3:
            item = item[None]
        if item.ndim != 4 or item.shape[1] != 1:
            raise InvalidInputError(f"mask_image[{i}] of shape {tuple(item.shape)}; expected "
                                    "[N, 1, H, W] (or a grayscale image)")
        out.append(item.detach().float().cpu())
    mask = torch.cat(out)
    if tuple(mask.shape[2:]) != tuple(size):
        raise InvalidInputError(f"mask_image of size {tuple(mask.shape[2:])} (height, width); "
                                f"expected the image's {tuple(size)}")
    if not bool(torch.isfinite(mask).all()):
        raise InvalidInputError("mask_image contains NaN or inf; expected values in [0, 1]")
    return (mask >= 0.5).float()


def latent_mask(mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The pixel mask at the latent size [N, 1, h, w] (nearest, as diffusers' inpaint pipeline)."""
    return torch.nn.functional.interpolate(mask, size=tuple(shape[2:]))


# ---------------------------------------------------------------------------------------------
# A request's image inputs (Engine.prepare)


MASKED_CONTENT = ("original", "noise")  # where the masked region starts (below strength 1)


def check(engine, image, strength, steps: int, latents) -> tuple[int, torch.Tensor | None]:
    """(first step of the plan that runs, pixels [N, 3, H, W]) of an image request, or (0, None)."""
    from .validation import check_real

    if image is None:
        return 0, None
    check_real("strength", strength, 0.0, 1.0, low_open=True)
    if latents is not None:
        raise InvalidInputError("latents with image; expected one of them: image-to-image "
                                "draws its start from the image and the generator")
    if engine.components.initial_step is not None:
        raise InvalidInputError("image with an initial-step model; SingDiffusion's predictor "
                                "replaces only the pure-noise start of text-to-image")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InvalidInputError(f"strength={strength} with num_inference_steps={steps}: "
                                f"int({steps} * {strength}) = 0 steps would run; expected "
                                f"strength >= {1 / steps:.3g} or more steps")
    return steps - run, pixels(image)


def size(images: torch.Tensor, height, width) -> tuple[int, int]:
    """(height, width) of an image request: the image's; a different size is refused."""
    own = tuple(images.shape[2:])
    for name, value, side in (("height", height, own[0]), ("width", width, own[1])):
        if value is not None and value != side:
            raise InvalidInputError(f"{name}={value} with an image of {own[0]}x{own[1]} (height x "
                                    "width); expected the image's size (Lumen does not resize)")
    return own


def start(engine, images: torch.Tensor, mask_image, strength: float, shape: tuple, generator,
          plan, dp, cfg: bool, masked_content: str = "original"
          ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(x_T, step noise, inpaint inputs) of an image request, drawn in diffusers' order.

    Per image i, from generator i: the image's posterior sample (always for image-to-image and
    for a 4-channel inpaint, whose kept region needs it; for a 9-channel inpaint only below
    strength 1), then the start noise, then (inpainting) the masked image's posterior sample,
    then any step noise. Image-to-image starts from the image noised to the first listed point;
    inpainting at strength 1 starts from pure noise, as diffusers' inpaint pipeline does.
    """
    from .runtime import draw_noise, generator_list
    from .validation import check_choice

    check_choice("masked_content", masked_content, MASKED_CONTENT)
    if masked_content != "original" and mask_image is None:
        raise InvalidInputError(f"masked_content={masked_content!r} without mask_image; expected "
                                "a mask whose white region starts from noise")
    n, device = shape[0], engine.device
    if images.shape[0] not in (1, n):
        raise InvalidInputError(f"{images.shape[0]} images for {n} outputs (prompts x "
                                "num_images_per_prompt); expected 1 or one per output")
    generators = generator_list(generator, n)
    images = images.expand(n, -1, -1, -1)
    concat = engine.components.unet.config.in_channels == 9
    mask = None if mask_image is None else mask_pixels(mask_image, tuple(images.shape[2:]))
    if mask is not None and mask.shape[0] not in (1, n):
        raise InvalidInputError(f"{mask.shape[0]} masks for {n} outputs; expected 1 or one per output")
    latent_shape = (n, 4, *shape[2:]) if concat else shape
    x0 = start_x0 = None
    if not (concat and strength == 1.0):
        x0 = start_x0 = checked(encode(images, engine.components, generators, device, engine.dtype),
                                latent_shape)
        if masked_content == "noise" and strength < 1.0:  # A1111's "latent noise": the region
            # starts from noise (at strength 1 every region does, with nothing drawn for it)
            m = latent_mask(mask, shape).to(device)
            z = torch.stack([torch.randn(latent_shape[1:], generator=g,
                                         device=g.device if g is not None else "cpu")
                             for g in generators]).to(device)
            start_x0 = x0 * (1 - m) + z * m
    masked = []
    between = None
    if mask is not None:
        mask = mask.expand(n, -1, -1, -1)
        kept = (images * 2 - 1) * (mask < 0.5)  # diffusers: the image in [-1, 1] where kept, 0 elsewhere

        def between(i, g):
            masked.append(encode(kept[i:i + 1], engine.components, [g], device, engine.dtype,
                                 signed=True))
    x_T, noise = draw_noise(generator, latent_shape, plan, device, None, between)
    eps = x_T
    if x0 is not None and not (mask is not None and strength == 1.0):
        x_T = dp.a_start * start_x0 + dp.s_start * x_T  # the noised image; a = 0 gives eps exactly
    if mask is None:
        return x_T, noise, {}
    m = latent_mask(mask, shape).to(device)
    if concat:
        cond = torch.cat([m, torch.cat(masked)], dim=1).to(engine.dtype)
        return x_T, noise, {"cond": torch.cat([cond, cond]) if cfg else cond}
    return x_T, noise, {"mask": m, "x0": x0, "eps": eps}


def checked(x0: torch.Tensor, shape: tuple) -> torch.Tensor:
    if tuple(x0.shape) != tuple(shape):
        raise InvalidInputError(f"the image encodes to {tuple(x0.shape[1:])}; the UNet takes "
                                f"{tuple(shape[1:])} (channels, height/f, width/f)")
    return x0
