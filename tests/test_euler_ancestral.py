"""Euler ancestral (k-diffusion's sample_euler_ancestral): eta = 0 is Euler, exact first step
at zero terminal SNR, step noise from each image's generator, parity with diffusers."""
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from lumen import engine
from lumen.engine import SamplerConfig
from lumen.engine.samplers import make_plan

from conftest import oracle_engine


def run(config, S, eta, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 3, 8, 8, generator=g)
    emb = torch.randn(2, 2, 4, generator=g)
    return oracle_engine(x0, config).run(prompt_embeds=emb, negative_prompt_embeds=emb, eta=eta,
                                         num_inference_steps=S, guidance_scale=3.0,
                                         generator=[torch.Generator().manual_seed(seed + i) for i in range(2)],
                                         output_type="latent").images


@pytest.mark.parametrize("spacing", ["trailing", "karras", "leading"])
def test_eta_zero_is_euler_bit_for_bit(tiny_unet, spacing):
    config = SamplerConfig(timestep_spacing=spacing)
    euler = make_plan(config.replace(sampler="euler"), 9)
    ancestral = make_plan(config.replace(sampler="euler_ancestral"), 9, eta=0.0)
    assert torch.equal(ancestral.coef[:, 0], euler.coef[:, 2]) and torch.equal(ancestral.coef[:, 1], euler.coef[:, 3])
    assert not ancestral.needs_noise and torch.equal(ancestral.timesteps, euler.timesteps)
    emb = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))

    def images(sampler):
        eng = engine.build(tiny_unet, scheduler=config.replace(sampler=sampler))
        return eng.run(prompt_embeds=emb, negative_prompt_embeds=-emb, num_inference_steps=4,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(images("euler_ancestral"), images("euler"))


def test_first_step_from_infinite_sigma_is_x0_form():
    """sigma_up -> eta*sigma_p as sigma -> inf: x_p = a_p*x0 + s_p*sqrt(1-eta^2)*x_T + eta*s_p*z."""
    config = SamplerConfig(sampler="euler_ancestral")
    abar_p = float(config.train_abar()[899])
    for eta in (0.0, 0.5, 1.0):
        coef = make_plan(config, 10, eta).coef
        assert bool(torch.isfinite(coef).all())
        assert coef[0, 0] == pytest.approx(abar_p**0.5, rel=1e-15)
        assert coef[0, 1] == pytest.approx(((1 - abar_p) * (1 - eta**2)) ** 0.5, rel=1e-12, abs=1e-15)
        assert coef[0, 2] == pytest.approx(eta * (1 - abar_p) ** 0.5, rel=1e-12)
        assert coef[-1].tolist() == [1.0, 0.0, 0.0]  # the final step to sigma = 0 adds no noise


def test_step_noise_comes_from_each_images_generator(tiny_unet):
    eng = engine.build(tiny_unet, scheduler=SamplerConfig(sampler="euler_ancestral"))
    assert make_plan(eng.config, 3, eta=1.0).needs_noise

    def run(seeds, eta=1.0):
        emb = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
        return eng.run(prompt_embeds=emb.expand(len(seeds), 7, 32), guidance_scale=1.0, eta=eta,
                       num_inference_steps=3, output_type="latent",
                       generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    both, alone = run([5, 9]), run([9])
    # Same draws; the UNet's batched kernels differ only at fp32 rounding level.
    torch.testing.assert_close(both[1], alone[0], rtol=1e-4, atol=1e-4)
    assert float((run([9], eta=0.0) - alone).abs().max()) > 1e-2


def test_engine_accepts_eta_for_euler_ancestral_only(tiny_unet):
    emb = torch.zeros(1, 7, 32)
    eng = engine.build(tiny_unet, scheduler=SamplerConfig(sampler="euler_ancestral"))
    out = eng.run(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=2, eta=0.5, output_type="latent")
    assert bool(torch.isfinite(out.images).all())
    with pytest.raises(engine.InvalidInputError, match="eta=0.5 with sampler='euler'"):
        eng.with_config(eng.config.replace(sampler="euler")).run(prompt_embeds=emb, guidance_scale=1.0,
                                                                  num_inference_steps=2, eta=0.5)


def diffusers_euler_ancestral(unet, scheduler, x_T, pos, neg, w, S):
    """diffusers' pipeline loop; step() draws its noise from a generator seeded 0."""
    scheduler.set_timesteps(S)
    # diffusers works in VE state x/a; its pipelines scale by init_noise_sigma, which is sigma_max
    # for linspace/trailing spacing rather than sqrt(sigma_max^2 + 1): feed the exact VE start.
    x = x_T * (1 + scheduler.sigmas[0].double() ** 2).sqrt().float()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            m_neg, m_pos = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=torch.cat([neg, pos])).sample.chunk(2)
            x = scheduler.step(m_neg + w * (m_pos - m_neg), t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("prediction_type,spacing", [("epsilon", "leading"), ("epsilon", "linspace"),
                                                     ("v_prediction", "trailing")])
def test_matches_diffusers_euler_ancestral_on_stable_diffusions_schedule(tiny_unet, prediction_type, spacing):
    """SD's scaled_linear schedule (no zero SNR), eta = 1 (diffusers has no eta), fed the same noise.

    Tolerance 1e-4: diffusers keeps sigmas in float32, and an epsilon model's x0 = (x - s*eps)/a
    amplifies that rounding by 1/a_T ~ 15 at the first step.
    """
    S, w = 10, 7.5
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    scheduler = EulerAncestralDiscreteScheduler(**sd)
    eng = engine.build(tiny_unet, scheduler=scheduler)
    assert eng.config.sampler == "euler_ancestral" and not eng.config.zero_terminal_snr
    g = torch.Generator().manual_seed(3)
    x_T, pos, neg = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    draws = torch.Generator().manual_seed(0)  # the draws step() makes, in its order
    noise = torch.stack([torch.randn(2, 4, 8, 8, generator=draws) for _ in range(S)], dim=1)  # [N, S, ...]
    request = eng.prepare(prompt_embeds=pos, negative_prompt_embeds=neg, latents=x_T, num_inference_steps=S,
                          guidance_scale=w, guidance_rescale=0.0, eta=1.0)
    assert request["noise"].shape == noise.shape
    ours = eng.sample(**{**request, "noise": noise})
    theirs = diffusers_euler_ancestral(tiny_unet, scheduler, x_T, pos, neg, w, S)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float(theirs.std()) > 0.1
