"""SDXL-style UNets (addition_embed_type="text_time"): pooled embeddings and time ids reach the UNet."""
import pytest
import torch

from lumen import engine
from lumen.engine import InvalidInputError

from conftest import make_tiny_unet

POOLED, TIME_DIM = 16, 8


@pytest.fixture(scope="module")
def sdxl_engine():
    unet = make_tiny_unet(addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                          projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
    return engine.build(unet, device="cpu")


def request(n_prompts=1, **kw):
    g = torch.Generator().manual_seed(0)
    args = dict(prompt_embeds=torch.randn(n_prompts, 7, 32, generator=g),
                negative_prompt_embeds=torch.randn(n_prompts, 7, 32, generator=g),
                pooled_prompt_embeds=torch.randn(n_prompts, POOLED, generator=g),
                num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                output_type="latent")
    return {**args, **kw}


def recorded_calls(eng, **kw):
    calls = []
    runner = eng.runner

    def recording(x, t, emb, **added):
        calls.append(added)
        return runner(x, t, emb, **added)
    spy = engine.Engine(eng.components, eng.config, recording, eng.device, eng.dtype)
    out = spy.run(**request(**kw)).images
    return calls, out


def test_pooled_embeddings_and_time_ids_reach_the_unet(sdxl_engine):
    args = request(n_prompts=2)
    calls, _ = recorded_calls(sdxl_engine, n_prompts=2, num_images_per_prompt=2, height=8, width=16)
    assert len(calls) == 2
    text, time_ids = calls[0]["text_embeds"], calls[0]["time_ids"]
    pooled = args["pooled_prompt_embeds"].repeat_interleave(2, dim=0)
    torch.testing.assert_close(text, torch.cat([torch.zeros_like(pooled), pooled]))
    # original (h, w), crop (0, 0), target (h, w) in pixels; this model has no VAE (factor 1)
    assert time_ids.tolist() == [[8.0, 16.0, 0.0, 0.0, 8.0, 16.0]] * 8


def test_pooled_embeddings_change_the_image(sdxl_engine):
    base = sdxl_engine.run(**request()).images
    other = sdxl_engine.run(**request(pooled_prompt_embeds=torch.ones(1, POOLED))).images
    assert (base - other).abs().max() > 1e-3


def test_negative_pooled_and_no_cfg(sdxl_engine):
    neg = torch.full((1, POOLED), 0.5)
    calls, _ = recorded_calls(sdxl_engine, negative_pooled_prompt_embeds=neg)
    torch.testing.assert_close(calls[0]["text_embeds"][0], neg[0])
    calls, _ = recorded_calls(sdxl_engine, guidance_scale=1.0, negative_prompt_embeds=None)
    assert calls[0]["text_embeds"].shape == (1, POOLED)


@pytest.mark.parametrize("change, message", [
    (dict(pooled_prompt_embeds=None), r"SDXL-style .*expected pooled_prompt_embeds \[1, 16\]"),
    (dict(pooled_prompt_embeds=torch.zeros(1, 5)), r"pooled_prompt_embeds of shape \(1, 5\); expected \(1, 16\)"),
    (dict(pooled_prompt_embeds=torch.zeros(2, POOLED)), r"expected \(1, 16\) \(one pooled embedding per prompt\)"),
    (dict(negative_pooled_prompt_embeds=torch.zeros(3, POOLED)), r"negative_pooled_prompt_embeds of shape \(3, 16\)"),
    (dict(pooled_prompt_embeds=torch.full((1, POOLED), float("nan"))), "contains NaN"),
])
def test_bad_pooled_embeddings_are_refused(sdxl_engine, change, message):
    with pytest.raises(InvalidInputError, match=message):
        sdxl_engine.run(**request(**change))


def test_pooled_embeddings_for_a_plain_unet_are_refused(tiny_unet):
    eng = engine.build(tiny_unet, device="cpu")
    with pytest.raises(InvalidInputError, match="takes no added conditioning"):
        eng.run(**request())
