"""Bad input is refused before any model call, with an error naming the value (issue: runtime core)."""
import json
import math

import pytest
import torch

from lumen import engine
from lumen.engine import BackendUnavailableError, InvalidInputError, InvalidTypeError, SamplerConfig

from conftest import make_tiny_pipeline


class Spy:
    """Wraps an engine's UNet runner and counts calls."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.runner(*args)


@pytest.fixture(scope="module")
def eng(tiny_unet):
    e = engine.build(make_tiny_pipeline(tiny_unet))  # VAE factor 2: 16x16 images, 8x8 latents
    e.runner = Spy(e.runner)
    return e


@pytest.fixture
def good():
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(2, 12, 32, generator=g),
                negative_prompt_embeds=torch.randn(2, 12, 32, generator=g), num_inference_steps=2)


BAD_VALUES = [
    (dict(num_inference_steps=0), "num_inference_steps=0"),
    (dict(num_inference_steps=-3), "num_inference_steps=-3"),
    (dict(num_inference_steps=1001), "num_inference_steps=1001"),
    (dict(guidance_scale=0.5), "guidance_scale=0.5"),
    (dict(guidance_scale=math.nan), "guidance_scale=nan"),
    (dict(guidance_scale=math.inf), "guidance_scale=inf"),
    (dict(guidance_rescale=-0.1), "guidance_rescale=-0.1"),
    (dict(guidance_rescale=1.5), "guidance_rescale=1.5"),
    (dict(guidance_rescale=math.nan), "guidance_rescale=nan"),
    (dict(eta=-0.5), "eta=-0.5"),
    (dict(eta=1.01), "eta=1.01"),
    (dict(eta=math.nan), "eta=nan"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt=0"),
    (dict(output_type="jpeg"), "output_type='jpeg'"),
    (dict(prompt_embeds=torch.randn(2, 32)), r"prompt_embeds of shape \(2, 32\)"),
    (dict(prompt_embeds=torch.randn(2, 12, 16)), r"cross_attention_dim is 32"),
    (dict(negative_prompt_embeds=torch.randn(2, 5, 32)), r"negative_prompt_embeds of shape \(2, 5, 32\)"),
    (dict(negative_prompt_embeds=torch.randn(1, 12, 32)), r"negative_prompt_embeds of shape \(1, 12, 32\)"),
    (dict(prompt_embeds=torch.full((2, 12, 32), math.nan)), "prompt_embeds contains NaN"),
    (dict(negative_prompt_embeds=torch.full((2, 12, 32), math.inf)), "negative_prompt_embeds contains NaN or inf"),
    (dict(latents=torch.randn(2, 4, 8, 9), width=16), r"latents of shape \(2, 4, 8, 9\); expected \(2, 4, 8, 8\)"),
    (dict(latents=torch.randn(2, 4, 8, 9, 1)), r"latents of shape \(2, 4, 8, 9, 1\); expected \(2, 4, 8, 8\)"),
    (dict(latents=torch.randn(1, 4, 8, 8)), r"latents of shape \(1, 4, 8, 8\)"),
    (dict(latents=torch.full((2, 4, 8, 8), math.nan)), "latents contains NaN"),
    (dict(height=17), "height=17; expected a multiple of the VAE factor 2"),
    (dict(width=31), "width=31; expected a multiple of the VAE factor 2"),
    (dict(height=0), "height=0"),
    (dict(generator=[torch.Generator()] * 3), "3 generators for 2 images"),
    (dict(prompt="a cat"), "exactly one of prompt and prompt_embeds; got both"),
    (dict(prompt_embeds=None), "exactly one of prompt and prompt_embeds; got neither"),
    (dict(negative_prompt="x"), "at most one of negative_prompt and negative_prompt_embeds"),
]


BAD_TYPES = [
    (dict(num_inference_steps=2.5), "num_inference_steps=2.5 of type float"),
    (dict(num_inference_steps=True), "num_inference_steps=True of type bool"),
    (dict(guidance_scale="7"), "guidance_scale='7' of type str"),
    (dict(prompt_embeds=[[0.0]]), "prompt_embeds of type list"),
    (dict(latents=torch.zeros(2, 4, 8, 8, dtype=torch.int64)), "latents of dtype torch.int64"),
    (dict(generator=42), "generator of type int"),
    (dict(prompt_embeds=None, prompt=3), "prompt of type int"),
]


# Values -> ValueError (InvalidInputError); types -> TypeError (InvalidTypeError).
BAD_INPUTS = ([(c, m, ValueError, InvalidInputError) for c, m in BAD_VALUES]
              + [(c, m, TypeError, InvalidTypeError) for c, m in BAD_TYPES])


@pytest.mark.parametrize("change,message,builtin,lumen", BAD_INPUTS, ids=[m for _, m, _, _ in BAD_INPUTS])
def test_bad_input_raises_before_any_model_call(eng, good, change, message, builtin, lumen):
    calls = eng.runner.calls
    with pytest.raises(builtin, match=message) as info:
        eng.run(**{**good, **change})
    assert isinstance(info.value, lumen)
    assert eng.runner.calls == calls


def test_eta_with_a_non_ddim_sampler_is_refused(tiny_unet, good):
    eng = engine.build(tiny_unet, scheduler=SamplerConfig(sampler="heun"), device="cpu")
    with pytest.raises(InvalidInputError, match="eta=0.5 with sampler='heun'"):
        eng.run(**good, eta=0.5)


@pytest.mark.parametrize("field,value", [("sampler", "plms"), ("timestep_spacing", "uniform"),
                                         ("beta_schedule", "sigmoid"), ("prediction_type", "x0")])
def test_unknown_names_are_refused(field, value):
    with pytest.raises(InvalidInputError, match=f"{field}='{value}'; expected one of"):
        SamplerConfig(**{field: value})


def test_epsilon_model_with_zero_terminal_snr_is_refused():
    with pytest.raises(InvalidInputError, match="prediction_type='epsilon' with zero_terminal_snr=True"):
        SamplerConfig(prediction_type="epsilon")
    with pytest.raises(InvalidInputError, match="epsilon"):
        SamplerConfig.from_diffusers({"_class_name": "DDIMScheduler", "prediction_type": "epsilon",
                                      "rescale_betas_zero_snr": True})


def test_unsupported_diffusers_scheduler_is_named():
    with pytest.raises(InvalidInputError, match="'PNDMScheduler' has no Lumen equivalent"):
        SamplerConfig.from_diffusers({"_class_name": "PNDMScheduler"})


def test_prompt_without_text_encoder_is_refused(tiny_unet):
    with pytest.raises(InvalidInputError, match="no text encoder; pass prompt_embeds"):
        engine.build(tiny_unet, device="cpu").run(prompt="a cat", guidance_scale=1.0)


def test_guidance_without_negative_and_text_encoder_is_refused(tiny_unet, good):
    with pytest.raises(InvalidInputError, match="needs negative_prompt_embeds"):
        engine.build(tiny_unet, device="cpu").run(prompt_embeds=good["prompt_embeds"])


def test_tensorrt_without_tensorrt_fails_early_naming_the_fallback(tiny_unet):
    try:
        import tensorrt  # tensorrt-stubs alone gives an empty namespace package
        if hasattr(tensorrt, "Builder"):
            pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match="torch"):
        engine.build(tiny_unet, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="onnxruntime"):  # before reading the folder
        engine.build("/nonexistent/model", backend="tensorrt")


def test_unknown_backend_and_dtype_are_refused(tiny_unet):
    with pytest.raises(InvalidInputError, match="backend='cuda'"):
        engine.build(tiny_unet, backend="cuda")
    with pytest.raises(InvalidTypeError, match="dtype=torch.int8"):
        engine.build(tiny_unet, dtype=torch.int8)


def test_missing_folder_and_corrupt_config_are_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="never downloads"):
        engine.build(str(tmp_path / "absent"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(InvalidInputError, match="is not valid JSON"):
        engine.build(tmp_path)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{}")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidInputError, match="cannot load UNet2DConditionModel"):
        engine.build(tmp_path)


def test_diffusers_settings_lumen_cannot_honour_are_refused():
    with pytest.raises(InvalidInputError, match="trained_betas"):
        SamplerConfig.from_diffusers({"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]})
    with pytest.raises(InvalidInputError, match="solver_order=3"):
        SamplerConfig.from_diffusers({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})
    euler = SamplerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"})
    assert euler.timestep_spacing == "linspace" and euler.sampler == "euler"


def test_noise_lands_on_the_engine_device_whatever_the_generator():
    from lumen.engine.runtime import draw_noise
    from lumen.engine.samplers import make_plan

    plan = make_plan(SamplerConfig(), 3, eta=1.0)
    for generator in (None, torch.Generator()):
        x_T, noise = draw_noise(generator, (2, 4, 8, 8), plan, torch.device("meta"))
        assert x_T.device.type == "meta" and noise.device.type == "meta"


def test_steps_offset_past_the_last_timestep_is_refused_before_any_model_call(tiny_unet, good):
    eng = engine.build(tiny_unet, scheduler=SamplerConfig(zero_terminal_snr=False, prediction_type="epsilon",
                                                          timestep_spacing="leading", steps_offset=1),
                       device="cpu")
    eng.runner = Spy(eng.runner)
    with pytest.raises(InvalidInputError, match="steps_offset=1 moves leading timesteps outside"):
        eng.run(**{**good, "num_inference_steps": 1000})
    assert eng.runner.calls == 0
