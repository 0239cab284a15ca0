"""Prompt handling: text or embeddings -> validated [negative, positive] conditioning."""
from dataclasses import dataclass

import torch

from .clip import ClipPromptEncoder, SdxlPromptEncoder
from .errors import InvalidInputError, InvalidTypeError
from .models import TIME_IDS, Components, pooled_width
from .validation import check_embeddings, check_finite, check_int


@dataclass(frozen=True)
class TextConditioning:
    """Embeddings of one request: N = prompts x num_images_per_prompt rows, P = prompts."""

    pos: torch.Tensor  # [N, L, D]
    neg: torch.Tensor | None  # [N, L, D], None without CFG
    pooled: torch.Tensor | None  # [P, D_pooled]: SDXL only
    neg_pooled: torch.Tensor | None  # [P, D_pooled]; None means zeros


def embed_prompts(components: Components, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                  num_images_per_prompt: int, cfg: bool, pooled=None, negative_pooled=None,
                  clip_skip: int | None = None) -> TextConditioning:
    """Encode text (or check given embeddings) as diffusers' SD and SDXL pipelines do.

    Without a negative prompt an SDXL pipeline with force_zeros_for_empty_prompt conditions
    the negative batch on zeros; otherwise the negative is the encoding of negative_prompt ("").
    clip_skip applies to every prompt encoded here, negative included.
    """
    width = components.unet.config.cross_attention_dim
    if clip_skip is not None:
        check_int("clip_skip", clip_skip, 0)
    if (prompt is None) == (prompt_embeds is None):
        raise InvalidInputError("expected exactly one of prompt and prompt_embeds; got "
                                + ("both" if prompt is not None else "neither"))
    if prompt is not None:
        _no_pooled_with_text("pooled_prompt_embeds", pooled, "prompt")
        pos, pooled = _encode(components, _as_prompt_list("prompt", prompt), clip_skip)
    else:
        check_embeddings("prompt_embeds", prompt_embeds, width)
        pos = prompt_embeds
    neg = None
    if cfg:
        neg, negative_pooled = _negative(components, negative_prompt, negative_prompt_embeds,
                                         negative_pooled, pos, clip_skip)
    repeat = num_images_per_prompt  # [p0, p0, p1, p1], as diffusers
    return TextConditioning(pos.repeat_interleave(repeat, dim=0),
                            neg.repeat_interleave(repeat, dim=0) if neg is not None else None,
                            pooled, negative_pooled)


def time_ids(height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
             target_size=None) -> tuple[int, ...]:
    """SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w); the sizes
    default to the generated image's pixel size, as in StableDiffusionXLPipeline."""
    original = _pair("original_size", original_size, (height, width))
    crop = _pair("crops_coords_top_left", crops_coords_top_left, (0, 0))
    target = _pair("target_size", target_size, (height, width))
    return (*original, *crop, *target)


def added_conditioning(unet_config, text: TextConditioning, n_prompts: int, num_images_per_prompt: int,
                       cfg: bool, ids: tuple[int, ...], sizes_given: bool = False) -> dict[str, torch.Tensor]:
    """SDXL's added conditioning {text_embeds, time_ids}, [negative, positive] when cfg; {} otherwise.

    text.pooled: [P, D] pooled embeddings, one per prompt; a missing negative is zeros.
    ids: time_ids(...) of the request; sizes_given: whether the caller set any of them (a UNet
    without added conditioning refuses them).
    """
    pooled, negative_pooled = text.pooled, text.neg_pooled
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        if pooled is not None or negative_pooled is not None or sizes_given:
            raise InvalidInputError("pooled_prompt_embeds or SDXL sizes (original_size, "
                                    "crops_coords_top_left, target_size) given, but this UNet takes no "
                                    "added conditioning (addition_embed_type is not 'text_time')")
        return {}
    width = pooled_width(unet_config)
    if pooled is None:
        raise InvalidInputError(f"this UNet is SDXL-style (addition_embed_type='text_time'); "
                                f"expected pooled_prompt_embeds [{n_prompts}, {width}]")
    _check_pooled("pooled_prompt_embeds", pooled, (n_prompts, width))
    pos = pooled.repeat_interleave(num_images_per_prompt, dim=0)
    time = torch.tensor(ids, dtype=pos.dtype).expand(pos.shape[0], TIME_IDS)
    if not cfg:
        return {"text_embeds": pos, "time_ids": time}
    if negative_pooled is None:
        negative_pooled = torch.zeros_like(pooled)
    _check_pooled("negative_pooled_prompt_embeds", negative_pooled, (n_prompts, width))
    neg = negative_pooled.repeat_interleave(num_images_per_prompt, dim=0)
    return {"text_embeds": torch.cat([neg, pos]), "time_ids": torch.cat([time, time])}


def _pair(name: str, value, default) -> tuple[int, int]:
    if value is None:
        return tuple(default)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise InvalidInputError(f"{name}={value!r}; expected two integers >= 0 (height, width) "
                                "or (top, left)")
    return tuple(value)


def _check_pooled(name, pooled, shape):
    """One pooled embedding per prompt: [P, D]."""
    if not isinstance(pooled, torch.Tensor):
        raise InvalidTypeError(f"{name} of type {type(pooled).__name__}; expected a torch.Tensor {list(shape)}")
    if tuple(pooled.shape) != tuple(shape):
        raise InvalidInputError(f"{name} of shape {tuple(pooled.shape)}; expected {tuple(shape)} "
                                "(one pooled embedding per prompt)")
    check_finite(name, pooled)


def _no_pooled_with_text(name: str, pooled, text_name: str) -> None:
    if pooled is not None:
        raise InvalidInputError(f"{name} given with {text_name}; expected it only with "
                                f"{text_name}_embeds (text's pooled embedding comes from its encoder)")


def _negative(components, negative_prompt, negative_prompt_embeds, negative_pooled, pos, clip_skip):
    """(negative embeddings [P, L, D], negative pooled [P, D] or None)."""
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise InvalidInputError("expected at most one of negative_prompt and negative_prompt_embeds; got both")
    if negative_prompt_embeds is not None:
        check_embeddings("negative_prompt_embeds", negative_prompt_embeds, pos.shape[-1])
        if negative_prompt_embeds.shape != pos.shape:
            raise InvalidInputError(f"negative_prompt_embeds of shape {tuple(negative_prompt_embeds.shape)}; "
                                    f"expected the positive embeddings' shape {tuple(pos.shape)}")
        return negative_prompt_embeds, negative_pooled
    encoder = components.text_encoder
    if negative_prompt is None and getattr(encoder, "force_zeros_for_empty_prompt", False):
        return torch.zeros_like(pos), negative_pooled  # None: added_conditioning's zeros
    if encoder is None:
        raise InvalidInputError("guidance_scale != 1 needs negative_prompt_embeds: this model has no "
                                "text encoder to encode the empty prompt")
    _no_pooled_with_text("negative_pooled_prompt_embeds", negative_pooled, "negative_prompt")
    batch = pos.shape[0]
    negatives = [""] * batch if negative_prompt is None else _as_prompt_list("negative_prompt", negative_prompt)
    if len(negatives) == 1 and batch > 1:
        negatives = negatives * batch
    if len(negatives) != batch:
        raise InvalidInputError(f"{len(negatives)} negative prompts for {batch} prompts; expected 1 or {batch}")
    try:
        neg, neg_pooled = _encode(components, negatives, clip_skip)
    except InvalidInputError as err:  # the tokenizer's message says "prompt": name which one
        raise InvalidInputError(f"negative_prompt: {err}") from err
    if neg.shape != pos.shape:
        raise InvalidInputError(f"negative embeddings of shape {tuple(neg.shape)}; expected {tuple(pos.shape)}")
    return neg, neg_pooled


def _encode(components: Components, prompts: list[str], clip_skip: int | None):
    """(embeddings [B, L, D], pooled [B, P] or None) from the model's text encoder."""
    encoder = components.text_encoder
    if encoder is None:
        raise InvalidInputError("this model has no text encoder; pass prompt_embeds instead of prompt")
    with torch.inference_mode():
        if isinstance(encoder, (ClipPromptEncoder, SdxlPromptEncoder)):
            return tuple(encoder.encode(prompts, clip_skip))
        if clip_skip is not None:
            raise InvalidInputError(f"clip_skip={clip_skip} needs a CLIP text encoder; this model's "
                                    f"is {type(encoder).__name__}")
        return encoder.encode(prompts), None


def _as_prompt_list(name: str, prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidTypeError(f"{name} of type {type(prompt).__name__}; expected a string or a "
                               "non-empty list of strings")
    return list(prompts)
