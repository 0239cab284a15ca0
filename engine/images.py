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


def encode(images: torch.Tensor, components, generators: list, device, dtype) -> torch.Tensor:
    """x0 [N, C, h, w] fp32 of pixels [N, 3, H, W] in [0, 1]: image i's VAE posterior sampled
    with generator i (scaled as diffusers scales it), or the pixels in [-1, 1] without a VAE."""
    vae = components.vae
    if vae is None:
        return (images * 2 - 1).to(device)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i, g in enumerate(generators):
        x = (images[i:i + 1] * 2 - 1).to(device, components.vae_dtype(dtype))
        with torch.inference_mode():
            dist = vae.encode(x).latent_dist
            z = dist.sample(generator=g)  # drawn where g lives, as diffusers' randn_tensor
        out.append(((z.float() - shift) * vae.config.scaling_factor))
    return torch.cat(out)
