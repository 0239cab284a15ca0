"""Parity with diffusers' DDIMScheduler + rescale_noise_cfg on a small UNet
(docs/diffusers.md#schedulers).

Tolerance: |ours - diffusers| <= 1e-5 * (1 + |diffusers|) in fp32. Lumen builds the schedule in
float64; diffusers accumulates abar in float32, whose rounding (~1e-7 relative) the guidance
scale amplifies 7.5x, so an absolute 1e-5 alone would measure diffusers' rounding, not ours.
"""
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from lumen import engine


PAPER_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction", set_alpha_to_one=True, clip_sample=False)


def diffusers_ddim(unet, latents, pos, neg, S, w, phi, settings=PAPER_DDIM):
    """The loop of diffusers' StableDiffusionPipeline (default: the paper's scheduler settings)."""
    scheduler = DDIMScheduler(**settings)
    scheduler.set_timesteps(S)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if w > 1:  # diffusers skips the unconditional batch when guidance_scale <= 1
                m_neg, m_pos = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([neg, pos])).sample.chunk(2)
                m = m_neg + w * (m_pos - m_neg)
                if phi > 0:
                    m = rescale_noise_cfg(m, m_pos, guidance_rescale=phi)
            else:
                m = unet(x, t, encoder_hidden_states=pos).sample
            x = scheduler.step(m, t, x, eta=0.0).prev_sample
    return x


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, 7, 32, generator=g))


@pytest.mark.parametrize("S", [10, 25, 50])
@pytest.mark.parametrize("w,phi", [(1.0, 0.0), (1.0, 0.7), (7.5, 0.0), (7.5, 0.7)])
def test_matches_diffusers_ddim_with_rescaled_cfg(tiny_unet, inputs, S, w, phi):
    latents, pos, neg = inputs
    eng = engine.build(tiny_unet, device="cpu")
    ours = eng.run(prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents, num_inference_steps=S,
                   guidance_scale=w, guidance_rescale=phi, output_type="latent").images
    theirs = diffusers_ddim(tiny_unet, latents, pos, neg, S, w, phi)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float(theirs.std()) > 0.1  # a real image-sized signal, not a collapsed output


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("S", [10, 25])
def test_matches_diffusers_ddim_leading_on_stable_diffusions_schedule(tiny_unet, inputs, S, steps_offset):
    """SD's own configs: epsilon, no zero terminal SNR, leading spacing (961, 921, ..., 1 at S=25
    with steps_offset=1); set_alpha_to_one=True, whose last step lands on abar = 1 as Lumen's."""
    latents, pos, neg = inputs
    settings = dict(PAPER_DDIM, rescale_betas_zero_snr=False, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=steps_offset)
    eng = engine.build(tiny_unet, scheduler=DDIMScheduler(**settings), device="cpu")
    ours = eng.run(prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents, num_inference_steps=S,
                   guidance_scale=7.5, guidance_rescale=0.7, output_type="latent").images
    theirs = diffusers_ddim(tiny_unet, latents, pos, neg, S, 7.5, 0.7, settings)
    # x0 = (x - s*eps)/a: at t = 960, 1/a = 15 amplifies the fp32 rounding of diffusers' abar
    # table beyond the paper-settings test's 1e-5 (measured: at most 2e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float(theirs.std()) > 0.1
