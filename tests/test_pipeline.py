"""The public API end to end on a tiny Stable-Diffusion-shaped folder: prompts, VAE, outputs, seeds."""
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from lumen import engine
from lumen.engine import SamplerConfig

from conftest import make_tiny_unet


@pytest.fixture(scope="module")
def eng(tiny_pipeline_dir):
    return engine.build(str(tiny_pipeline_dir), device="cpu")


def test_text_prompts_generate_images_of_every_output_type(eng):
    common = dict(prompt=["a red cat", "a dog"], num_inference_steps=3, height=16, width=24)
    pil = eng.run(**common, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (24, 16) for im in pil)
    arr = eng.run(**common, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert arr.shape == (2, 16, 24, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))
    pt = eng.run(**common, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert pt.shape == (2, 3, 16, 24)
    torch.testing.assert_close(pt.permute(0, 2, 3, 1).numpy(), arr, rtol=0, atol=0)
    lat = eng.run(**common, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert lat.shape == (2, 4, 8, 12) and lat.dtype == torch.float32


def test_prompts_change_the_image(eng):
    a = eng.run(prompt="abc", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    b = eng.run(prompt="xyz", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert not torch.allclose(a.images, b.images, atol=1e-4)


def test_vae_decodes_the_unscaled_latents(eng):
    x0 = eng.run(prompt="cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="latent").images
    vae = eng.components.vae
    expected = (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    image = eng.run(prompt="cat", num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    torch.testing.assert_close(image, expected.detach())


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seed_gives_the_same_image_whatever_the_batch_size(eng, eta):
    def first(n):
        return eng.run(prompt="cat", num_images_per_prompt=n, num_inference_steps=4, eta=eta,
                       generator=torch.Generator().manual_seed(7), output_type="latent").images[0]
    # Same noise; only the UNet's batched kernels differ, at fp32 rounding level.
    torch.testing.assert_close(first(1), first(3), rtol=1e-4, atol=1e-4)


def test_generator_list_gives_each_image_its_own_seed(eng):
    def run(seeds):
        return eng.run(prompt="cat", num_images_per_prompt=len(seeds), num_inference_steps=3, eta=1.0,
                       generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    both, second = run([5, 9]), run([9])
    torch.testing.assert_close(both[1], second[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_latents_match_diffusers_randn_for_one_cpu_generator(eng):
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator().manual_seed(11)
    expected = randn_tensor((2, 4, 8, 8), generator=g)
    ours = eng.run(prompt="cat", num_images_per_prompt=2, num_inference_steps=1, guidance_scale=1.0,
                   latents=expected, output_type="latent").images
    drawn = eng.run(prompt="cat", num_images_per_prompt=2, num_inference_steps=1, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(11), output_type="latent").images
    torch.testing.assert_close(drawn, ours, rtol=0, atol=0)


def test_guidance_one_runs_only_the_positive_batch(eng):
    batches = []
    runner = eng.runner
    eng.runner = lambda x, t, e: batches.append(x.shape[0]) or runner(x, t, e)
    try:
        eng.run(prompt="cat", num_inference_steps=2, guidance_scale=1.0)
        eng.run(prompt="cat", num_inference_steps=2, guidance_scale=3.0)
    finally:
        eng.runner = runner
    assert batches == [1, 1, 2, 2]


def test_callback_is_called_once_per_step(eng):
    seen = []
    eng.run(prompt="cat", num_inference_steps=5, callback=seen.append)
    assert seen == [0, 1, 2, 3, 4]


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host (.item(), bool(tensor), ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host sync inside the sampling loop: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m"])
def test_sampling_loop_has_no_host_sync(eng, sampler):
    from lumen.engine import samplers

    config = SamplerConfig(sampler=sampler, timestep_spacing="karras" if sampler == "heun" else "trailing",
                           s_churn=5.0)
    eta = 1.0 if sampler == "ddim" else 0.0
    plan = samplers.make_plan(config, 4, eta)
    emb = torch.randn(2, 12, 32)
    x_T = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 4, 8, 8)
    dp, w, phi = plan.to("cpu"), torch.tensor(7.5), torch.tensor(0.7)
    with NoHostSync():
        out = eng.sample(emb, x_T, noise, dp, w, phi, cfg=True)
    assert out.shape == x_T.shape and bool(torch.isfinite(out).all())


def test_scheduler_argument_forms(tiny_unet, tiny_pipeline_dir):
    assert engine.build(tiny_unet, device="cpu").config == SamplerConfig()
    own = engine.build(str(tiny_pipeline_dir), device="cpu").config  # training facts from the folder, Lumen sampling
    assert own.prediction_type == "v_prediction" and own.zero_terminal_snr and own.timestep_spacing == "trailing"
    sd = dict(beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
    assert engine.build(tiny_unet, scheduler=DDIMScheduler(**sd), device="cpu").config == SamplerConfig(
        zero_terminal_snr=False, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
        beta_start=0.0001, beta_end=0.02)
    heun = engine.build(tiny_unet, scheduler=dict(HeunDiscreteScheduler(use_karras_sigmas=True,
                                                  prediction_type="v_prediction").config,
                                                  _class_name="HeunDiscreteScheduler"),
                        device="cpu").config
    assert heun.sampler == "heun" and heun.timestep_spacing == "karras"


@pytest.mark.parametrize("force_upcast", [True, False])
def test_vae_that_asks_for_upcast_stays_fp32_in_an_fp16_run(force_upcast):
    """SDXL's VAE overflows in fp16 and its config says force_upcast: decode it in fp32."""
    from diffusers import AutoencoderKL

    from lumen.engine.models import Components

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, force_upcast=force_upcast)
    parts = Components(make_tiny_unet(), vae=vae).to("cpu", torch.float16)
    assert parts.unet.dtype == torch.float16
    assert vae.dtype == (torch.float32 if force_upcast else torch.float16)
    assert parts.vae_dtype(torch.bfloat16) == torch.bfloat16  # diffusers upcasts fp16 only
