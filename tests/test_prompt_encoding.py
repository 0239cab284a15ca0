"""Text prompts as diffusers' SD and SDXL pipelines encode them: Lumen's images equal the
pipelines' own (tiny random-weight pipelines, zero-SNR v-prediction trailing DDIM)."""
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lumen import engine
from lumen.engine import InvalidInputError
from lumen.engine.prompts import embed_prompts

from conftest import make_tiny_sdxl_pipeline

# Measured: <= 2e-6 in [0, 1] pixel values (fp32; Lumen's schedule is float64, diffusers' fp32).
ATOL = 1e-4
REQUEST = dict(prompt=["a red cat", "dog"], num_inference_steps=10, guidance_scale=6.0,
               guidance_rescale=0.7, height=16, width=16, output_type="np")


def both(pipe, eng, **changes):
    """(diffusers' images, Lumen's images) for REQUEST with changes, same seed."""
    kw = {**REQUEST, **changes}
    theirs = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    ours = eng.run(**kw, generator=torch.Generator().manual_seed(0)).images
    assert theirs.std() > 0.05  # an image, not a collapsed output
    return theirs, ours


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    return pipe, engine.build(str(tiny_sdxl_dir), device="cpu")


@pytest.mark.parametrize("changes", [
    {},  # no negative prompt: force_zeros_for_empty_prompt gives zero negative embeddings
    dict(negative_prompt=["blue", "a cat"]),
    dict(num_images_per_prompt=2, original_size=(32, 24), crops_coords_top_left=(4, 2),
         target_size=(24, 16)),
    dict(clip_skip=1),
])
def test_sdxl_folder_matches_diffusers_pipeline(sdxl, changes):
    theirs, ours = both(*sdxl, **changes)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


def test_sdxl_pipeline_object_matches_and_force_zeros_false_encodes_the_empty_prompt():
    pipe = make_tiny_sdxl_pipeline(force_zeros_for_empty_prompt=False)
    eng = engine.build(pipe, device="cpu")
    theirs, ours = both(pipe, eng, prompt="a cat")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
    zeros = make_tiny_sdxl_pipeline()
    _, with_zeros = both(zeros, engine.build(zeros, device="cpu"), prompt="a cat")
    assert np.abs(with_zeros - ours).max() > 1e-3  # the setting changes the negative batch


@pytest.mark.parametrize("changes", [dict(negative_prompt=["blue", "a cat"]),
                                     dict(guidance_scale=1.0, clip_skip=1)])
def test_sd_folder_matches_diffusers_pipeline(tiny_pipeline_dir, changes):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):  # transformers 5: diffusers' clip_skip path needs it
        encoder.__dict__["text_model"] = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    theirs, ours = both(pipe, engine.build(str(tiny_pipeline_dir), device="cpu"), **changes)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)


def test_sdxl_embeddings_are_penultimate_states_and_pooled_projection(sdxl):
    pipe, eng = sdxl
    text = embed_prompts(eng.components, "a cat", None, None, None, 1, cfg=False)
    ids = [tok("a cat", padding="max_length", max_length=12, return_tensors="pt").input_ids
           for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    first = pipe.text_encoder(ids[0], output_hidden_states=True)
    second = pipe.text_encoder_2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(text.pos, torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1))
    torch.testing.assert_close(text.pooled, second.text_embeds)
    assert text.pos.shape == (1, 12, 64) and text.pooled.shape == (1, 16)


def test_clip_skip_applies_to_the_negative_prompt_too(sdxl):
    """diffusers encodes the negative prompt without clip_skip; Lumen uses the same layer for both."""
    eng = sdxl[1]
    text = embed_prompts(eng.components, "blue", "blue", None, None, 1, cfg=True, clip_skip=1)
    torch.testing.assert_close(text.neg, text.pos)
    torch.testing.assert_close(text.neg_pooled, text.pooled)
    plain = embed_prompts(eng.components, "blue", None, None, None, 1, cfg=False)
    assert (plain.pos - text.pos).abs().max() > 1e-3


def test_long_prompt_warns_with_the_truncated_text(sdxl, caplog):
    eng = sdxl[1]
    with caplog.at_level(logging.WARNING):
        embed_prompts(eng.components, ["abcdefghijklmnop", "ab"], None, None, None, 1, cfg=False)
    warnings = [(r.name, r.getMessage()) for r in caplog.records]
    # 12 tokens: start, ten letters, end; "klmnop" is cut. One warning for both tokenizers.
    assert warnings == [("lumen.engine.clip", "prompt longer than the tokenizer's 12 tokens; this part "
                                        "was truncated: ['klmnop']")]


@pytest.mark.parametrize("changes, message", [
    (dict(clip_skip=2), r"clip_skip=2; expected at most 1 for a text encoder of 2 layers"),
    (dict(clip_skip=-1), r"clip_skip=-1; expected an integer >= 0"),
    (dict(pooled_prompt_embeds=torch.zeros(2, 16)), r"pooled_prompt_embeds given with prompt"),
    (dict(original_size=(16,)), r"original_size=\(16,\); expected two integers >= 0"),
    (dict(crops_coords_top_left=(0, -1)), r"crops_coords_top_left=\(0, -1\)"),
])
def test_bad_sdxl_text_requests_are_refused(sdxl, changes, message):
    with pytest.raises(InvalidInputError, match=message):
        sdxl[1].run(**{**REQUEST, **changes})


def test_sdxl_sizes_for_a_unet_without_added_conditioning_are_refused(tiny_pipeline_dir):
    eng = engine.build(str(tiny_pipeline_dir), device="cpu")
    with pytest.raises(InvalidInputError, match="takes no added conditioning"):
        eng.run(prompt="cat", num_inference_steps=1, original_size=(16, 16))
