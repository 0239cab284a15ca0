"""Where diffusers is wrong, against the oracle: Lumen is right
(docs/diffusers.md#where-lumen-differs-from-diffusers-and-why)."""
import pytest
import torch
from diffusers import DDIMScheduler

from lumen.engine.config import SamplerConfig
from lumen.engine.samplers import make_plan

from conftest import OracleUNet, oracle_engine

ZERO_SNR_DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     rescale_betas_zero_snr=True, timestep_spacing="trailing",
                     prediction_type="v_prediction", set_alpha_to_one=True, clip_sample=False)


def diffusers_loop(scheduler, oracle, x_T, S, eta=0.0, inputs=None):
    scheduler.set_timesteps(S)
    x, g = x_T.clone(), torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        if inputs is not None:
            inputs.append((int(t), x.clone()))
        x = scheduler.step(oracle(x, t), t, x, eta=eta, generator=g).prev_sample
    return x


def lumen(config, x0, x_T, S, eta=0.0):
    eng = oracle_engine(x0, config)
    emb = torch.zeros(1, 2, 4)
    return eng.run(prompt_embeds=emb, negative_prompt_embeds=emb, latents=x_T, num_inference_steps=S,
                   eta=eta, guidance_scale=1.0, output_type="latent").images


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)


def test_trailing_seven_steps_lands_on_x0_where_diffusers_leaves_noise(problem):
    x0, x_T = problem
    theirs = diffusers_loop(DDIMScheduler(**ZERO_SNR_DDIM), OracleUNet(x0, SamplerConfig()), x_T, 7)
    # diffusers steps 142 -> 142 - 1000//7 = 0 and stops at abar_0: ~sqrt(1 - abar_0) * eps remains.
    assert float((theirs - x0).abs().max()) > 0.05
    torch.testing.assert_close(lumen(SamplerConfig(), x0, x_T, 7), x0, rtol=0, atol=1e-6)


def test_trailing_thirty_steps_feeds_the_model_off_schedule_inputs_in_diffusers(problem):
    """With eta = 0 and an exact model, x_t must be a_t*x0 + s_t*x_T at the timestep it is given."""
    x0, x_T = problem
    abar = SamplerConfig().train_abar().float()
    inputs = []
    diffusers_loop(DDIMScheduler(**ZERO_SNR_DDIM), OracleUNet(x0, SamplerConfig()), x_T, 30, inputs=inputs)
    mismatch = max(float((x - abar[t].sqrt() * x0 - (1 - abar[t]).sqrt() * x_T).abs().max())
                   for t, x in inputs)
    assert mismatch > 1e-3  # 999 -> 966 is fine, then 966 steps to 933 but 932 is evaluated next
    plan = make_plan(SamplerConfig(), 30)
    assert plan.timesteps.tolist() == [t for t, _ in inputs]  # same list; Lumen steps along it
    torch.testing.assert_close(lumen(SamplerConfig(), x0, x_T, 30), x0, rtol=0, atol=1e-6)


def test_linspace_feeds_the_model_off_schedule_inputs_in_diffusers(problem):
    """linspace S = 25 lists 999, 957, 916, ... (steps of 41.6), but diffusers' DDIM steps t - 40."""
    x0, x_T = problem
    linspace = dict(ZERO_SNR_DDIM, timestep_spacing="linspace")
    config = SamplerConfig.from_diffusers(DDIMScheduler(**linspace))
    abar = config.train_abar().float()
    inputs = []
    diffusers_loop(DDIMScheduler(**linspace), OracleUNet(x0, config), x_T, 25, inputs=inputs)
    mismatch = max(float((x - abar[t].sqrt() * x0 - (1 - abar[t]).sqrt() * x_T).abs().max())
                   for t, x in inputs)
    assert mismatch > 1e-3
    assert make_plan(config, 25).timesteps.tolist() == [t for t, _ in inputs]
    torch.testing.assert_close(lumen(config, x0, x_T, 25), x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("S", [25, 50])
def test_eta_one_is_finite_where_diffusers_gives_nan(problem, S):
    x0, x_T = problem
    theirs = diffusers_loop(DDIMScheduler(**ZERO_SNR_DDIM), OracleUNet(x0, SamplerConfig()), x_T, S, eta=1.0)
    if S == 25:  # where the unclamped fp32 sqrt fails depends on diffusers' rounding of its table
        assert bool(theirs.isnan().any())
    ours = lumen(SamplerConfig(), x0, x_T, S, eta=1.0)
    torch.testing.assert_close(ours, x0, rtol=0, atol=1e-6)


def test_final_step_lands_on_abar_one_where_sd_config_leaves_noise(problem):
    x0, x_T = problem
    sd = dict(ZERO_SNR_DDIM, rescale_betas_zero_snr=False, prediction_type="epsilon",
              timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    config = SamplerConfig.from_diffusers(DDIMScheduler(**sd))
    theirs = diffusers_loop(DDIMScheduler(**sd), OracleUNet(x0, config), x_T, 10)
    assert float((theirs - x0).abs().max()) > 0.02  # ~0.029 * eps left (diffusers #6068)
    torch.testing.assert_close(lumen(config, x0, x_T, 10), x0, rtol=0, atol=1e-5)
