"""Lumen's euler, heun and dpmpp_2m against diffusers' own scheduler loops, for every spacing
each class offers, on Stable Diffusion's (non-zero-SNR, epsilon) schedule
(docs/diffusers.md#schedulers).

The model is analytic: for Gaussian data x0 ~ N(mu, s^2) the exact E[x0 | x_t] is
mu + a s^2 / (a^2 s^2 + 1 - abar) * (x_t - a mu), so its eps depends on x and t and every
discretisation difference (a timestep, a sigma, a solver weight) shows in the result.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from lumen.engine import SamplerConfig
from lumen.engine.models import Components
from lumen.engine.runtime import Engine
from lumen.engine.samplers import make_plan

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
MU, S2 = 0.3, 0.25  # data mean and variance


class GaussianEps:
    """The exact eps of N(MU, S2) data at (x_VP, t); abar at a fractional t as diffusers
    interpolates it (sigma linear in t)."""

    def __init__(self, abar_train: torch.Tensor):
        self.sigma = ((1 - abar_train) / abar_train).sqrt().numpy()

    def __call__(self, x, t):
        sigma = float(np.interp(float(t), np.arange(len(self.sigma)), self.sigma))
        abar = 1 / (1 + sigma**2)
        a, var = abar**0.5, 1 - abar
        x0 = MU + a * S2 / (a * a * S2 + var) * (x - a * MU)
        return (x - a * x0) / var**0.5


def diffusers_loop(scheduler, model, noise, S):
    """The Euler/Heun/DPM pipeline loop: x_T = noise * init_noise_sigma, inputs scaled."""
    scheduler.set_timesteps(S)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(x_in, t), t, x).prev_sample
    return x, scheduler


def lumen(config, model, x_T, S):
    unet = torch.nn.Module()
    unet.config = SimpleNamespace(sample_size=8, in_channels=4, cross_attention_dim=4)
    eng = Engine(Components(unet), config, lambda x, t, emb: model(x, t),
                 torch.device("cpu"), torch.float32)
    emb = torch.zeros(1, 2, 4)
    return eng.run(prompt_embeds=emb, latents=x_T, num_inference_steps=S, guidance_scale=1.0,
                   output_type="latent").images


CASES = [(cls, spacing) for cls in (EulerDiscreteScheduler, HeunDiscreteScheduler, DPMSolverMultistepScheduler)
         for spacing in ("linspace", "leading", "trailing", "karras")]


@pytest.mark.parametrize("S", [7, 25])
@pytest.mark.parametrize("cls, spacing", CASES, ids=[f"{c.__name__}-{s}" for c, s in CASES])
def test_matches_the_diffusers_scheduler_loop(cls, spacing, S):
    kw = dict(use_karras_sigmas=True) if spacing == "karras" else dict(timestep_spacing=spacing)
    scheduler = cls(**SD, steps_offset=1, **kw)
    config = SamplerConfig.from_diffusers(scheduler)
    model = GaussianEps(config.train_abar())
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs, scheduler = diffusers_loop(scheduler, model, noise, S)
    # Lumen's state is VP, as DPM-Solver's; Euler's and Heun's is VE, x_VE = sqrt(sigma^2 + 1) x_VP.
    # Their linspace and trailing runs start from noise * sigma_max instead of
    # noise * sqrt(sigma_max^2 + 1) (docs/diffusers.md#where-lumen-differs-from-diffusers-and-why):
    # to compare the samplers, Lumen is given that same, slightly short, start.
    sigma_0 = float(scheduler.sigmas[0])
    ve = cls is not DPMSolverMultistepScheduler
    x_T = noise * float(scheduler.init_noise_sigma) / (sigma_0**2 + 1) ** 0.5 if ve else noise
    plan = make_plan(config, S)
    their_t = scheduler.timesteps.double()
    if cls is HeunDiscreteScheduler:  # [t0, t1, t1, t2, t2, ...]: each t once
        their_t = torch.cat([their_t[:1], their_t[1::2]])
    ours_t = plan.timesteps if cls is not HeunDiscreteScheduler else plan.timesteps[[0, *range(1, 2 * S - 1, 2)]]
    torch.testing.assert_close(ours_t, their_t, rtol=1e-6, atol=1e-3)
    ours = lumen(config, model, x_T, S)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    assert float((theirs - MU).abs().mean()) > 0.1  # a sample, not the mean


def test_diffusers_linspace_start_is_too_little_noise():
    """noise * sigma_max instead of noise * sqrt(sigma_max^2 + 1): 0.23% short at t = 999."""
    scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    scheduler.set_timesteps(25)
    sigma_max = float(scheduler.sigmas[0])
    assert float(scheduler.init_noise_sigma) == pytest.approx(sigma_max)
    assert 1 - sigma_max / (sigma_max**2 + 1) ** 0.5 == pytest.approx(0.0023, abs=1e-4)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_ancestral_samples_on_its_own_timesteps_and_sigmas(spacing):
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    scheduler.set_timesteps(13)
    plan = make_plan(SamplerConfig.from_diffusers(scheduler), 13)
    torch.testing.assert_close(plan.timesteps, scheduler.timesteps.double(), rtol=0, atol=1e-3)
    sigma = ((1 - plan.abar) / plan.abar).sqrt()
    # diffusers keeps abar in fp32: its smallest sigmas are ~1e-5 off, relative
    torch.testing.assert_close(sigma, scheduler.sigmas[:-1].double(), rtol=1e-4, atol=0)
