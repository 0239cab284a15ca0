"""Schedules, zero terminal SNR and spacing: Lin et al. Tables 1 and 2 and Algorithm 1
(docs/math.md#training-beta-schedules, docs/math.md#zero-terminal-snr-algorithm-1,
docs/math.md#timestep-spacing)."""
import math

import pytest
import torch

from lumen.engine.config import SamplerConfig
from lumen.engine.samplers import make_plan, step_schedule
from lumen.engine.schedules import (make_betas, rescale_zero_terminal_snr, spaced_timesteps, train_abar)

SCHEDULES = [("linear", 1e-4, 0.02), ("squaredcos_cap_v2", 0.0, 0.0), ("scaled_linear", 0.00085, 0.012)]


# sqrt(abar_T) is printed to 6 decimals for two rows: compare to half a unit of that place.
@pytest.mark.parametrize("name,start,end,snr_T,sqrt_abar_T,sqrt_tol", [
    ("linear", 1e-4, 0.02, 4.035993e-05, 0.006353, 5e-7),
    ("squaredcos_cap_v2", 0.0, 0.0, 2.428735e-09, 4.928220e-05, 5e-12),
    ("scaled_linear", 0.00085, 0.012, 4.681912e-03, 0.068265, 5e-7),
])
def test_terminal_snr_matches_paper_table_1(name, start, end, snr_T, sqrt_abar_T, sqrt_tol):
    # Table 1 was computed with fp32 betas and an fp32 cumulative product.
    abar = torch.cumprod(1 - make_betas(name, 1000, start, end).float(), dim=0)
    assert float(abar[-1] / (1 - abar[-1])) == pytest.approx(snr_T, rel=5e-7)
    assert float(abar[-1].sqrt()) == pytest.approx(sqrt_abar_T, abs=sqrt_tol)


@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_zero_snr_invariants(name, start, end):
    original = train_abar(name, 1000, start, end, zero_terminal_snr=False)
    abar = train_abar(name, 1000, start, end, zero_terminal_snr=True)
    betas = rescale_zero_terminal_snr(make_betas(name, 1000, start, end, max_beta=1.0))
    assert abar[-1] == 0.0 and betas[-1] == 1.0  # exactly
    assert float(abar[0]) == pytest.approx(float(original[0]), rel=1e-12)
    assert bool((abar[1:] < abar[:-1]).all())
    assert bool(((betas >= 0) & (betas <= 1)).all())


def test_zero_snr_is_linear_in_sqrt_abar():
    a = train_abar("scaled_linear", 1000, 0.00085, 0.012, False).sqrt()
    a_new = train_abar("scaled_linear", 1000, 0.00085, 0.012, True).sqrt()
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    torch.testing.assert_close(a_new, expected, rtol=1e-12, atol=1e-15)


def test_spacings_for_ten_steps_match_paper_table_2():
    assert spaced_timesteps("leading", 1000, 10).tolist() == list(range(900, -1, -100))
    assert spaced_timesteps("leading", 1000, 10, steps_offset=1).tolist() == list(range(901, 0, -100))
    assert spaced_timesteps("linspace", 1000, 10).tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert spaced_timesteps("trailing", 1000, 10).tolist() == list(range(999, 0, -100))


def test_trailing_one_step_is_last_timestep():
    assert spaced_timesteps("trailing", 1000, 1).tolist() == [999]


def test_trailing_seven_steps_are_read_from_the_list():
    assert spaced_timesteps("trailing", 1000, 7).tolist() == [999, 856, 713, 570, 428, 285, 142]


@pytest.mark.parametrize("S", [*range(1, 51), 999, 1000])
def test_trailing_starts_at_T_minus_1_with_unique_descending_entries(S):
    t = spaced_timesteps("trailing", 1000, S)
    assert t[0] == 999 and len(t) == S
    assert bool((t[1:] < t[:-1]).all()) and int(t.min()) >= 0


@pytest.mark.parametrize("S", [7, 30])
def test_previous_abar_comes_from_the_next_listed_timestep(S):
    config = SamplerConfig()
    t, abar = step_schedule(config, S)
    listed = spaced_timesteps("trailing", 1000, S)
    torch.testing.assert_close(abar[:-1], config.train_abar()[listed], rtol=0, atol=0)
    assert abar[-1] == 1.0  # the last step lands on the clean sample


@pytest.mark.parametrize("S", [0, -1, 1001])
def test_step_count_out_of_range_raises(S):
    with pytest.raises(ValueError, match=f"num_inference_steps={S}"):
        spaced_timesteps("trailing", 1000, S)


def test_karras_zero_snr_spends_first_step_at_infinite_sigma():
    t, abar = step_schedule(SamplerConfig(timestep_spacing="karras"), 10)
    assert t[0] == 999 and abar[0] == 0 and abar[-1] == 1
    assert bool((abar[1:] > abar[:-1]).all())
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_plans_stay_finite_in_fp16(sampler, spacing):
    config = SamplerConfig(sampler=sampler, timestep_spacing=spacing, s_churn=10.0)
    for S in (1, 2, 10, 50):
        plan = make_plan(config, S).to("cpu", torch.float16)
        for tensor in (plan.timesteps, plan.a, plan.s, plan.coef):
            assert bool(torch.isfinite(tensor).all()), (S, tensor)


def test_cosine_cap_is_lifted_only_for_zero_snr():
    capped = make_betas("squaredcos_cap_v2", 1000, 0, 0)
    assert math.isclose(float(capped[-1]), 0.999)
    assert train_abar("squaredcos_cap_v2", 1000, 0, 0, True)[-1] == 0.0
