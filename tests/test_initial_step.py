"""SingDiffusion's initial-step predictor plugged into the first step
(docs/math.md#singdiffusions-initial-step)."""
import torch

from lumen.engine import SamplerConfig
from lumen.engine.samplers import make_plan

from conftest import oracle_engine


class HalfPredictor(torch.nn.Module):
    """x0_hat = u for the negative half of the batch and c for the positive half."""

    def __init__(self, u: float, c: float):
        super().__init__()
        self.u, self.c = u, c
        self.weight = torch.nn.Parameter(torch.zeros(()))  # so .to(dtype) has something to move

    def forward(self, x_T, emb):
        half = x_T.shape[0] // 2
        out = torch.full_like(x_T, self.c)
        if emb.shape[0] == 2 * half and half > 0:
            out[:half] = self.u
        return out


def first_model_input(config, predictor, w):
    x0 = torch.zeros(1, 3, 4, 4)
    eng = oracle_engine(x0, config)
    eng.components.initial_step = predictor
    seen = []
    runner = eng.runner
    eng.runner = lambda x, t, e: seen.append(x[-1:].clone()) or runner(x, t, e)
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.zeros(1, 2, 4)
    eng.run(prompt_embeds=emb, negative_prompt_embeds=emb, latents=x_T, guidance_scale=w,
            num_inference_steps=10, output_type="latent")
    return seen[0], x_T


def test_hand_over_starts_from_forward_diffusion_of_the_prediction():
    config = SamplerConfig(zero_terminal_snr=False, prediction_type="epsilon", timestep_spacing="leading",
                           steps_offset=1)
    plan = make_plan(config, 10).to("cpu")
    x, x_T = first_model_input(config, HalfPredictor(0.0, 0.5), w=1.0)
    torch.testing.assert_close(x, plan.a[0] * 0.5 + plan.s[0] * x_T)


def test_hand_over_guidance_is_normalised_by_w():
    config = SamplerConfig(zero_terminal_snr=False, prediction_type="epsilon")
    plan = make_plan(config, 10).to("cpu")
    x, x_T = first_model_input(config, HalfPredictor(0.2, 0.6), w=4.0)
    expected_x0 = (0.2 + 4.0 * (0.6 - 0.2)) / 4.0
    torch.testing.assert_close(x, plan.a[0] * expected_x0 + plan.s[0] * x_T)


def test_hand_over_is_a_no_op_at_zero_terminal_snr():
    x, x_T = first_model_input(SamplerConfig(), HalfPredictor(0.2, 0.6), w=4.0)
    torch.testing.assert_close(x, x_T, rtol=0, atol=0)


def test_hand_over_lands_before_churn_at_the_first_listed_timestep():
    config = SamplerConfig(zero_terminal_snr=False, prediction_type="epsilon", sampler="heun", s_churn=10.0)
    plan = make_plan(config, 5)
    abar_t0 = float(config.train_abar()[999])  # trailing spacing starts at T-1
    assert plan.abar_start == abar_t0 and float(plan.abar[0]) < abar_t0  # eval point 0 is churned
    dp = plan.to("cpu")
    torch.testing.assert_close(dp.a_start, torch.tensor(abar_t0**0.5, dtype=torch.float32))
