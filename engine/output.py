"""Turning the final sample into the requested output type, as diffusers pipelines do."""
import torch

from .errors import InvalidInputError
from .models import Components

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@torch.inference_mode()
def decode(x0: torch.Tensor, components: Components, output_type: str):
    """x0: [N, C, h, w] fp32 -> PIL list, [N, H, W, C] array, [N, C, H, W] tensor in [0, 1], or x0."""
    if output_type == "latent":
        return x0
    vae = components.vae
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = x0 / vae.config.scaling_factor + shift
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
    elif x0.shape[1] in (1, 3):
        image = x0  # a pixel-space model: the sample is the image in [-1, 1]
    else:
        raise InvalidInputError(f"output_type={output_type!r} for a model with {x0.shape[1]}-channel "
                                "samples and no VAE; expected output_type='latent'")
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(array)
