"""Prompt handling: text or embeddings -> validated [negative, positive] embeddings."""
import torch

from .errors import InvalidInputError, InvalidTypeError
from .models import Components
from .validation import check_embeddings


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
    neg = _encode(components, negatives)
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
