"""ControlNet against diffusers' own ControlNet pipelines: the same tiny models, scheduler and
seed give the same latents to 1e-4 (docs/api.md#controlnet). Runs have 5 steps: with trailing
spacing, diffusers' DDIM steps to t - T // S, which is the next listed timestep only when S
divides T (docs/diffusers.md)."""
import pytest
import torch

from lumen import engine

from conftest import make_tiny_pipeline, make_tiny_unet

PROMPT, NEGATIVE = "a cat", "a dog"
SIZE = 64  # pixels: the tiny VAE's factor 2 gives 32x32 latents


def make_controlnet(unet, seed: int):
    """ControlNetModel.from_unet with a small conditioning embedding (factor 2, as the tiny
    VAE's), its zero-initialised convs given random weights so that the control matters."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out]
        for conv in zero:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def parts():
    unet = make_tiny_unet(seed=7)
    pipe = make_tiny_pipeline(unet)
    nets = [make_controlnet(unet, 11), make_controlnet(unet, 12)]
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in nets]
    return pipe, nets, images


def theirs(pipe, nets, images, steps=5, **kw):
    from diffusers import StableDiffusionControlNetPipeline

    control = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=nets[0] if len(nets) == 1 else nets, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    control.set_progress_bar_config(disable=True)
    return control(PROMPT, negative_prompt=NEGATIVE, image=images[0] if len(nets) == 1 else images,
                   num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def ours(eng, images, steps=5, **kw):
    return eng.run(PROMPT, negative_prompt=NEGATIVE, control_image=images[0] if len(images) == 1
                   else images, num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.0,
                   height=SIZE, width=SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kw).images


CASES = [  # (ControlNets, run arguments): diffusers' argument names and semantics
    (1, {}),
    (1, dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7)),
    (1, dict(guess_mode=True)),
    (2, dict(controlnet_conditioning_scale=[0.8, 1.3])),
    (2, dict(control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0])),
]


@pytest.mark.parametrize("count,kw", CASES)
def test_matches_stable_diffusion_controlnet_pipeline(parts, count, kw):
    pipe, nets, images = parts
    nets, images = nets[:count], images[:count]
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    got, want = ours(eng, images, **kw), theirs(pipe, nets, images, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = engine.build(pipe, scheduler=pipe.scheduler, device="cpu").run(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
        guidance_rescale=0.0, height=SIZE, width=SIZE, output_type="latent",
        generator=torch.Generator().manual_seed(0)).images
    assert float((got - plain).abs().max()) > 1e-2  # the control changed the result
