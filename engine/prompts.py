"""Prompt handling: text or embeddings -> validated [negative, positive] embeddings."""
import torch

from .errors import InvalidInputError, InvalidTypeError
from .models import Components
from .validation import check_embeddings, check_finite

TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)


def embed_prompts(components: Components, prompt, negative_prompt, prompt_embeds,
                  negative_prompt_embeds, num_images_per_prompt: int, cfg: bool):
    """(positive [N, L, D], negative [N, L, D] or None), N = prompts x num_images_per_prompt."""
    width = components.unet.config.cross_attention_dim
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidInputError("expected exactly one of prompt and prompt_embeds; got "
                                + ("both" if prompt is not None else "neither"))
    if prompt is not None:
        prompts = _as_prompt_list("prompt", prompt)
        pos = _encode(components, prompts)
    else:
        check_embeddings("prompt_embeds", prompt_embeds, width)
        pos = prompt_embeds
    neg = _negative(components, negative_prompt, negative_prompt_embeds, pos, width) if cfg else None
    pos = pos.repeat_interleave(num_images_per_prompt, dim=0)  # [p0, p0, p1, p1], as diffusers
    return pos, (neg.repeat_interleave(num_images_per_prompt, dim=0) if neg is not None else None)


def added_conditioning(unet_config, pooled, negative_pooled, n_prompts: int,
                       num_images_per_prompt: int, cfg: bool, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """SDXL's added conditioning {text_embeds, time_ids}, [negative, positive] when cfg; {} otherwise.

    pooled: [P, D] pooled text embeddings (P prompts), one per prompt; the negative defaults to zeros (SDXL's
    force_zeros_for_empty_prompt). time_ids = original size (h, w), crop (0, 0), target size
    (h, w), all the generated image's pixel size, as diffusers' SDXL pipeline does by default.
    """
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        if pooled is not None or negative_pooled is not None:
            raise InvalidInputError("pooled_prompt_embeds given, but this UNet takes no added "
                                    "conditioning (addition_embed_type is not 'text_time')")
        return {}
    width = unet_config.projection_class_embeddings_input_dim - TIME_IDS * unet_config.addition_time_embed_dim
    if pooled is None:
        raise InvalidInputError(f"this UNet is SDXL-style (addition_embed_type='text_time'); "
                                f"expected pooled_prompt_embeds [{n_prompts}, {width}]")
    _check_pooled("pooled_prompt_embeds", pooled, (n_prompts, width))
    pos = pooled.repeat_interleave(num_images_per_prompt, dim=0)
    time_ids = torch.tensor([*size, 0, 0, *size], dtype=pos.dtype).expand(pos.shape[0], TIME_IDS)
    if not cfg:
        return {"text_embeds": pos, "time_ids": time_ids}
    if negative_pooled is None:
        negative_pooled = torch.zeros_like(pooled)
    _check_pooled("negative_pooled_prompt_embeds", negative_pooled, (n_prompts, width))
    neg = negative_pooled.repeat_interleave(num_images_per_prompt, dim=0)
    return {"text_embeds": torch.cat([neg, pos]), "time_ids": torch.cat([time_ids, time_ids])}


def _check_pooled(name, pooled, shape):
    """One pooled embedding per prompt: [P, D]."""
    if not isinstance(pooled, torch.Tensor):
        raise InvalidTypeError(f"{name} of type {type(pooled).__name__}; expected a torch.Tensor {list(shape)}")
    if tuple(pooled.shape) != tuple(shape):
        raise InvalidInputError(f"{name} of shape {tuple(pooled.shape)}; expected {tuple(shape)} "
                                "(one pooled embedding per prompt)")
    check_finite(name, pooled)


def _negative(components, negative_prompt, negative_prompt_embeds, pos, width):
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InvalidInputError("expected at most one of negative_prompt and negative_prompt_embeds; got both")
    if negative_prompt_embeds is not None:
        check_embeddings("negative_prompt_embeds", negative_prompt_embeds, width)
        if negative_prompt_embeds.shape != pos.shape:
            raise InvalidInputError(f"negative_prompt_embeds of shape {tuple(negative_prompt_embeds.shape)}; "
                                    f"expected the positive embeddings' shape {tuple(pos.shape)}")
        return negative_prompt_embeds
    if components.text_encoder is None:
        raise InvalidInputError("guidance_scale != 1 needs negative_prompt_embeds: this model has no "
                                "text encoder to encode the empty prompt")
    batch = pos.shape[0]
    negatives = [""] * batch if negative_prompt is None else _as_prompt_list("negative_prompt", negative_prompt)
    if len(negatives) == 1 and batch > 1:
        negatives = negatives * batch
    if len(negatives) != batch:
        raise InvalidInputError(f"{len(negatives)} negative prompts for {batch} prompts; expected 1 or {batch}")
    try:
        neg = _encode(components, negatives)
    except InvalidInputError as err:  # the tokenizer's message says "prompt": name which one
        raise InvalidInputError(f"negative_prompt: {err}") from err
    if neg.shape != pos.shape:
        raise InvalidInputError(f"negative embeddings of shape {tuple(neg.shape)}; expected {tuple(pos.shape)}")
    return neg


def _encode(components: Components, prompts: list[str]) -> torch.Tensor:
    if components.text_encoder is None:
        raise InvalidInputError("this model has no text encoder; pass prompt_embeds instead of prompt")
    with torch.inference_mode():
        return components.text_encoder.encode(prompts)


def _as_prompt_list(name: str, prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidTypeError(f"{name} of type {type(prompt).__name__}; expected a string or a "
                               "non-empty list of strings")
    return list(prompts)
