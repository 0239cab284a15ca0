"""Samplers against the oracle model: every sampler lands on x0, v at abar = 0 is exact, fp16
stays finite, and EDM's first step from sigma = inf is taken in x0 form.

The math: docs/math.md#ddim and docs/math.md#edm-euler-and-heun.
"""
import pytest
import torch

from lumen.engine.config import SamplerConfig
from lumen.engine.prediction import to_x0_eps
from lumen.engine.samplers import make_plan

from conftest import oracle_engine

SAMPLERS = ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"]


def run_oracle(config, S, eta=0.0, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 3, 8, 8, generator=g)
    eng = oracle_engine(x0, config, dtype)
    emb = torch.zeros(batch, 2, 4)
    out = eng.run(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=S, eta=eta,
                  generator=g, output_type="latent").images
    return out, x0, eng


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", ["trailing", "karras", "linspace", "leading"])
@pytest.mark.parametrize("S", [1, 2, 7, 10, 25])
def test_oracle_output_is_x0(sampler, spacing, S):
    out, x0, _ = run_oracle(SamplerConfig(sampler=sampler, timestep_spacing=spacing), S)
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_oracle_output_is_x0_for_each_zero_snr_prediction_type(prediction_type):
    for sampler in SAMPLERS:
        out, x0, _ = run_oracle(SamplerConfig(sampler=sampler, prediction_type=prediction_type), 10)
        torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-6)


def test_oracle_output_is_x0_for_epsilon_without_zero_snr():
    config = SamplerConfig(prediction_type="epsilon", zero_terminal_snr=False, timestep_spacing="leading",
                           steps_offset=1)
    for sampler in SAMPLERS:
        out, x0, _ = run_oracle(config.replace(sampler=sampler), 10)
        torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_stochastic_samplers_never_produce_nan(sampler, eta):
    for S in [*range(1, 51), 999]:
        out, x0, _ = run_oracle(SamplerConfig(sampler=sampler), S, eta=eta, batch=1)
        assert bool(torch.isfinite(out).all()), S
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_heun_churn_with_oracle_still_lands_on_x0():
    config = SamplerConfig(sampler="heun", timestep_spacing="karras", s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    out, x0, eng = run_oracle(config, 10)
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-5)
    assert make_plan(config, 10).needs_noise


def test_v_at_last_timestep_gives_x0_minus_v_and_eps_x_T_exactly():
    x_T, v = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    plan = make_plan(SamplerConfig(), 10).to("cpu")
    assert plan.a[0] == 0 and plan.s[0] == 1
    x0, eps = to_x0_eps(v, x_T, plan.a[0], plan.s[0], "v_prediction")
    assert torch.equal(x0, -v) and torch.equal(eps, x_T)


def test_first_ddim_step_from_pure_noise_is_x0_form():
    """x_p = sqrt(abar_p)*(-v) + sqrt(1-abar_p)*x_T (docs/math.md#ddim)."""
    config = SamplerConfig()
    plan = make_plan(config, 10)
    abar_p = float(config.train_abar()[899])
    assert plan.coef[0, 0] == pytest.approx(abar_p**0.5, rel=1e-15)
    assert plan.coef[0, 1] == pytest.approx((1 - abar_p) ** 0.5, rel=1e-15)
    assert plan.coef[0, 2] == 0


@pytest.mark.parametrize("sampler", ["heun", "euler"])
def test_edm_has_no_corrector_or_churn_at_infinite_sigma(sampler):
    plan = make_plan(SamplerConfig(sampler=sampler, timestep_spacing="karras", s_churn=80.0), 10)
    assert plan.coef[0, 0] == 1 and plan.coef[0, 1] == 0  # no churn at sigma = inf
    assert plan.corrector[0] is False and plan.corrector[-1] is False
    assert all(plan.corrector[1:-1]) == (sampler == "heun")
    assert bool((plan.coef[1:-1, 1] > 0).all())  # churn everywhere sigma is finite and in band


def test_heun_uses_2S_minus_2_evaluations_at_zero_snr():
    out, x0, eng = run_oracle(SamplerConfig(sampler="heun", timestep_spacing="karras"), 10, batch=1)
    assert eng.components.unet.calls == 18


def test_heun_is_second_order_on_a_smooth_problem():
    """With a model whose x0 depends on x_t, Heun's error shrinks ~4x per step doubling, Euler's ~2x."""
    def error(sampler, S):
        config = SamplerConfig(sampler=sampler, timestep_spacing="karras", zero_terminal_snr=False,
                               prediction_type="sample", sigma_max=10.0)
        plan = make_plan(config, S).to("cpu", torch.float64)
        x_T = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)

        def denoise(x, k):  # data ~ N(0, 1): E[x0 | x_t] = a*x_t (VP, abar + s^2 = 1)
            x0 = plan.a[k] * x
            return x0, (x - plan.a[k] * x0) / plan.s[k]
        from lumen.engine.samplers import sample
        return sample(denoise, x_T * plan.s[0], plan, torch.zeros(1, S, 1, 1, 1, dtype=torch.float64))
    exact = error("heun", 400)
    heun = [float((error("heun", S) - exact).abs()) for S in (8, 16)]
    euler = [float((error("euler", S) - exact).abs()) for S in (8, 16)]
    assert heun[0] / heun[1] > 3.0 and euler[0] / euler[1] < 2.5
    assert heun[1] < euler[1]


def test_fp16_model_dtype_stays_finite():
    for sampler in SAMPLERS:
        out, x0, _ = run_oracle(SamplerConfig(sampler=sampler), 25, dtype=torch.float16)
        assert bool(torch.isfinite(out).all())
        torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=5e-3)
