"""Turning the final sample into the requested output type, as diffusers pipelines do."""
import torch

from .errors import InvalidInputError, InvalidTypeError, NonFiniteOutputError
from .models import Components

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@torch.inference_mode()
def decode(x0: torch.Tensor, components: Components, output_type: str, dtype: torch.dtype = torch.float32):
    """x0: [N, C, h, w] fp32 -> PIL list, [N, H, W, C] array, [N, C, H, W] tensor in [0, 1], or x0.

    NaN or inf in x0 (the model ran in `dtype`) or in the decoded image raises
    NonFiniteOutputError: one host sync each, after the loop, never a black image.
    """
    check_output(x0, "final latents", dtype)
    if output_type == "latent":
        return x0
    vae = components.vae
    if vae is not None:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = x0 / vae.config.scaling_factor + shift
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0].float()
        check_output(image, "decoded image", vae.dtype)
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


def check_output(t: torch.Tensor, stage: str, dtype: torch.dtype) -> None:
    """Raise NonFiniteOutputError if t holds NaN or inf (stage: "final latents" or "decoded image")."""
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    advice = ("the VAE overflowed: decode in fp32 (dtype=torch.float32, or a VAE whose config says "
              "force_upcast)" if stage == "decoded image" else
              "the model overflowed or diverged: try dtype=torch.float32")
    raise NonFiniteOutputError(f"NaN or inf in the {stage}: {bad} of {t.numel()} values, computed in "
                               f"{str(dtype).removeprefix('torch.')}; {advice}")


def set_vae_options(vae, vae_slicing: bool, vae_tiling: bool) -> None:
    """Sliced (one image at a time) and tiled decoding through diffusers' own VAE switches."""
    for name, value in (("vae_slicing", vae_slicing), ("vae_tiling", vae_tiling)):
        if not isinstance(value, bool):
            raise InvalidTypeError(f"{name}={value!r}; expected True or False")
        if value and vae is None:
            raise InvalidInputError(f"{name}=True, but this model has no VAE (its samples are "
                                    "the images); expected False")
    if vae is None:
        return
    for option, value in (("slicing", vae_slicing), ("tiling", vae_tiling)):
        if not hasattr(vae, f"enable_{option}"):
            if value:
                raise InvalidInputError(f"vae_{option}=True, but {type(vae).__name__} has no "
                                        f"enable_{option}; expected False")
            continue
        try:
            getattr(vae, f"enable_{option}" if value else f"disable_{option}")()
        except NotImplementedError as err:
            raise InvalidInputError(f"vae_{option}=True: {err}") from err
