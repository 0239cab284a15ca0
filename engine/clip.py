"""CLIP prompt encoders, as diffusers' Stable Diffusion and SDXL pipelines encode prompts.

`encode(prompts, clip_skip)` returns an `Encoding`: the per-token embeddings [B, L, D] the UNet
cross-attends to, and, for SDXL, the pooled embedding [B, P] of its second encoder.
"""
import logging
import threading
from typing import NamedTuple

import torch

from .errors import InvalidInputError

logger = logging.getLogger(__name__)
_TOKENIZER_LOCK = threading.Lock()


class Encoding(NamedTuple):
    embeds: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None  # [B, P] (SDXL), else None


def token_ids(tokenizer, prompts: list[str], warn: bool = True) -> torch.Tensor:
    """Ids [B, model_max_length], padded and truncated; a truncated prompt logs a warning with
    the text that was cut (when warn), as diffusers pipelines do."""
    limit = tokenizer.model_max_length
    # A fast tokenizer stores each call's padding and truncation settings in its backend, so two
    # threads calling it with different settings can get each other's; the lock keeps the pair
    # of calls together.
    with _TOKENIZER_LOCK:
        ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True,
                        return_tensors="pt").input_ids
        if not warn:
            return ids
        # verbose=False: our warning replaces transformers' generic one about the same prompt
        untruncated = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids
    if untruncated.shape[-1] > limit:
        # ids minus the start and end tokens that truncation keeps
        removed = tokenizer.batch_decode(untruncated[:, limit - 1:-1], skip_special_tokens=True)
        cut = [text for text in removed if text]
        logger.warning("prompt longer than the tokenizer's %d tokens; this part was truncated: %s",
                       limit, cut)
    return ids


def hidden_layer(text_encoder, clip_skip: int | None, from_end: int) -> int:
    """Index into hidden_states [num_layers + 1 entries]: -(clip_skip + from_end); checked."""
    layers = text_encoder.config.num_hidden_layers
    skip = clip_skip or 0
    if skip + from_end > layers + 1:
        raise InvalidInputError(f"clip_skip={clip_skip}; expected at most {layers + 1 - from_end} "
                                f"for a text encoder of {layers} layers")
    return -(skip + from_end)


class ClipPromptEncoder:
    """Stable Diffusion 1.x/2.x: the last hidden state, or with clip_skip = k the hidden state k
    layers earlier through the final LayerNorm (StableDiffusionPipeline.encode_prompt)."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.module = tokenizer, text_encoder

    @property
    def parts(self) -> tuple:
        return (self.module,)

    @torch.no_grad()
    def encode(self, prompts: list[str], clip_skip: int | None = None) -> Encoding:
        ids = token_ids(self.tokenizer, prompts).to(self.module.device)
        mask = None
        if getattr(self.module.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()  # SD 2.x-style encoders
        if not clip_skip:
            return Encoding(self.module(ids, attention_mask=mask)[0], None)
        layer = hidden_layer(self.module, clip_skip, 1)
        hidden = self.module(ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        text_model = getattr(self.module, "text_model", self.module)  # transformers 5 has no wrapper
        return Encoding(text_model.final_layer_norm(hidden), None)


class SdxlPromptEncoder:
    """SDXL: each encoder's penultimate hidden state (or clip_skip layers before it),
    concatenated along features, and the projected pooled output of the last encoder
    (StableDiffusionXLPipeline.encode_prompt). The refiner has the second encoder only.

    force_zeros_for_empty_prompt: the pipeline's setting; with it, no negative prompt means
    zero negative embeddings rather than the encoding of "".
    """

    def __init__(self, tokenizers, text_encoders, force_zeros_for_empty_prompt: bool = True):
        self.tokenizers, self.modules_ = tuple(tokenizers), tuple(text_encoders)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def parts(self) -> tuple:
        return self.modules_

    @property
    def pooled_dim(self) -> int:
        return self.modules_[-1].config.projection_dim

    @torch.no_grad()
    def encode(self, prompts: list[str], clip_skip: int | None = None) -> Encoding:
        embeds = []
        for i, (tokenizer, module) in enumerate(zip(self.tokenizers, self.modules_)):
            layer = hidden_layer(module, clip_skip, 2)
            ids = token_ids(tokenizer, prompts, warn=i == 0)  # both tokenizers cut the same text
            out = module(ids.to(module.device), output_hidden_states=True)
            embeds.append(out.hidden_states[layer])
        return Encoding(torch.cat(embeds, dim=-1), out.text_embeds)
