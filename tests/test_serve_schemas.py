"""How A1111 and OpenAI request fields map onto the engine (no server, no model)."""
import math

import pytest

from lumen.engine import InvalidInputError, SamplerConfig
from lumen.serve import Limits
from lumen.serve.schemas import (A1111Txt2ImgRequest, InvalidRequest, OpenAIImageRequest, a1111_order,
                           openai_order)

BASE = SamplerConfig()


def a1111(**fields):
    return a1111_order(A1111Txt2ImgRequest(width=32, height=32, **fields), BASE, 64 * 64, 8)


@pytest.mark.parametrize("name,scheduler,sampler,spacing", [
    ("Euler a", "Automatic", "euler_ancestral", "trailing"), ("DDIM", None, "ddim", "trailing"),
    ("Heun", "Karras", "heun", "karras"), ("DPM++ 2M Karras", None, "dpmpp_2m", "karras"),
    ("k_euler", "karras", "euler", "karras"), ("dpm++ 2m", "Automatic", "dpmpp_2m", "trailing")])
def test_a1111_sampler_and_scheduler_names(name, scheduler, sampler, spacing):
    (order, _) = a1111(sampler_name=name, scheduler=scheduler)
    assert (order.key.config.sampler, order.key.config.timestep_spacing) == (sampler, spacing)


def test_a1111_falls_back_to_sampler_index_as_a1111_does():
    assert a1111(sampler_index="Euler a")[1] == "Euler a"
    assert a1111()[1] == "Euler"


def test_a1111_eta_defaults_and_applies_only_where_a1111_applies_it():
    assert a1111(sampler_name="Euler a")[0].key.eta == 1.0
    assert a1111(sampler_name="Euler a", eta=0.3)[0].key.eta == 0.3
    assert a1111(sampler_name="DDIM")[0].key.eta == 0.0
    assert a1111(sampler_name="Heun", eta=1.0)[0].key.eta == 0.0  # Heun takes no eta


def test_a1111_churn_for_euler_and_heun_with_s_tmax_zero_as_infinity():
    config = a1111(sampler_name="Heun", s_churn=5, s_tmin=0.1, s_tmax=0, s_noise=None)[0].key.config
    assert (config.s_churn, config.s_tmin, config.s_tmax, config.s_noise) == (5, 0.1, math.inf, 1.0)
    assert a1111(sampler_name="Euler", s_churn=0, s_noise=0)[0].key.config == BASE.replace(sampler="euler")
    assert a1111(sampler_name="DDIM", s_churn=5)[0].key.config.s_churn == 0  # DDIM ignores churn


def test_a1111_seeds_and_image_count():
    order, _ = a1111(seed=7, batch_size=2, n_iter=3, prompt="red", negative_prompt="blue")
    assert order.seeds == (7, 8, 9, 10, 11, 12)
    assert order.prompts == ("red",) * 6 and order.negative_prompts == ("blue",) * 6
    assert all(0 <= s < 2**32 + 1 for s in a1111(seed=-1)[0].seeds)


def test_openai_defaults_to_the_models_size_and_its_sampler():
    order = openai_order(OpenAIImageRequest(prompt="red", n=2, seed=3), BASE, (32, 32), 64 * 64, 8)
    assert (order.key.width, order.key.height, order.key.config) == (32, 32, BASE)
    assert order.seeds == (3, 4) and order.negative_prompts == ("", "")


@pytest.mark.parametrize("fields,param", [({"size": "32"}, "size"), ({"size": "0x32"}, "size"),
                                          ({"n": 0}, "n"), ({"sampler": "lms"}, "sampler"),
                                          ({"seed": 2**63}, "seed")])
def test_openai_refusals_name_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        openai_order(OpenAIImageRequest(prompt="red", **fields), BASE, (32, 32), 64 * 64, 8)
    assert err.value.param == param and param in str(err.value)


@pytest.mark.parametrize("limits,message", [({"max_batch": 0}, "max_batch=0"),
                                            ({"max_images": 9}, "max_images=9"),
                                            ({"timeout_s": 0}, "timeout_s=0"),
                                            ({"api_key": ""}, "api_key=''")])
def test_server_limits_are_checked(limits, message):
    with pytest.raises(InvalidInputError, match=message):
        Limits(**limits)
