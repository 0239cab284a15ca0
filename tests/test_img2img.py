"""Image-to-image against diffusers' own StableDiffusionImg2ImgPipeline on a tiny offline
pipeline (docs/diffusers.md#image-to-image), and on the built-in pixel-space model.

Same model, same scheduler, same generator: diffusers draws the VAE posterior sample, then the
start noise (then the ancestral steps' noise); Lumen draws them in that order from image i's
generator. Latents are compared before decoding. Tolerance 1e-4 absolute + relative: Lumen's
schedule is float64, diffusers' tables fp32 (see tests/test_parity.py).
"""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline)

from lumen import engine

from conftest import make_tiny_pipeline, make_tiny_unet

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction")
PROMPT, NEGATIVE = "a cat", "a dog"
SCHEDULERS = [  # (class, settings): each sampler diffusers offers, trailing and leading spacing
    (DDIMScheduler, dict(ZERO_SNR, timestep_spacing="trailing", clip_sample=False)),
    (DDIMScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=True)),
    (EulerDiscreteScheduler, dict(ZERO_SNR, timestep_spacing="trailing")),
    (EulerDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                  steps_offset=1)),
    (EulerAncestralDiscreteScheduler, dict(ZERO_SNR, timestep_spacing="trailing")),
    (EulerAncestralDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                           steps_offset=1)),
    (DPMSolverMultistepScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                       steps_offset=1)),
    (DPMSolverMultistepScheduler, dict(ZERO_SNR, timestep_spacing="trailing",
                                       final_sigmas_type="zero")),
    (HeunDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                 steps_offset=1)),
    (HeunDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="trailing")),
]


@pytest.fixture(scope="module")
def parts():
    pipe = make_tiny_pipeline(make_tiny_unet())
    g = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, 16, 16, generator=g)
    return pipe, image


def both(pipe, scheduler, image, strength, steps=10, guidance=7.5):
    """(Lumen's latents, diffusers' latents) of one img2img request."""
    img2img = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
    img2img.set_progress_bar_config(disable=True)
    theirs = img2img(PROMPT, image=image, strength=strength, num_inference_steps=steps,
                     guidance_scale=guidance, negative_prompt=NEGATIVE, output_type="latent",
                     generator=torch.Generator().manual_seed(11)).images
    eng = engine.build(pipe, scheduler=scheduler, device="cpu")
    eta = 1.0 if isinstance(scheduler, EulerAncestralDiscreteScheduler) else 0.0  # diffusers' own
    ours = eng.run(PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength,
                   num_inference_steps=steps, guidance_scale=guidance, guidance_rescale=0.0,
                   eta=eta, generator=torch.Generator().manual_seed(11), output_type="latent").images
    return ours, theirs


def clamps_abar_t(cls, settings, strength) -> bool:
    """diffusers' sigma-based schedulers clamp a zero terminal abar to 2^-24, so their strength-1
    start keeps image/4096 (docs/diffusers.md#image-to-image); Lumen's is pure noise."""
    return strength == 1.0 and settings.get("rescale_betas_zero_snr", False) and cls is not DDIMScheduler


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("cls,settings", SCHEDULERS,
                         ids=[f"{c.__name__}-{s['timestep_spacing']}" for c, s in SCHEDULERS])
def test_matches_diffusers_img2img_pipeline(parts, cls, settings, strength):
    pipe, image = parts
    ours, theirs = both(pipe, cls(**settings), image, strength)
    if clamps_abar_t(cls, settings, strength):
        # measured: Euler 3.7e-4, DPM-Solver++ 2.5e-3 (its second order carries the start on)
        diff = float((ours - theirs).abs().max())
        assert 1e-5 < diff < 5e-3
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float(theirs.std()) > 0.1


def test_strength_sets_how_much_of_the_image_is_kept(parts):
    """Lower strength starts closer to the image: the result moves toward its latents."""
    pipe, image = parts
    eng = engine.build(pipe, device="cpu")
    x0 = eng.components.vae.encode(image * 2 - 1).latent_dist.mean * eng.components.vae.config.scaling_factor
    dist = []
    for strength in (0.2, 0.5, 1.0):
        out = eng.run(PROMPT, image=image, strength=strength, num_inference_steps=10,
                      generator=torch.Generator().manual_seed(0), output_type="latent").images
        dist.append(float((out - x0).abs().mean()))
    assert dist[0] < dist[1] < dist[2]


def test_strength_one_at_zero_snr_is_pure_noise_and_never_divides_by_zero(parts):
    """Trailing spacing at zero terminal SNR: a = 0 at the first point, so x_T = noise exactly and
    the image's content is ignored (only its posterior draw moves the generator)."""
    pipe, image = parts
    eng = engine.build(pipe, device="cpu")
    kwargs = dict(num_inference_steps=5, generator=torch.Generator().manual_seed(3))
    start = eng.prepare(PROMPT, image=image, strength=1.0, **kwargs)
    other = eng.prepare(PROMPT, image=torch.zeros_like(image) + 0.5, strength=1.0,
                        num_inference_steps=5, generator=torch.Generator().manual_seed(3))
    assert float(start["dp"].a_start) == 0.0 and bool(torch.isfinite(start["x_T"]).all())
    g = torch.Generator().manual_seed(3)
    eng.components.vae.encode(image * 2 - 1).latent_dist.sample(generator=g)  # the posterior draw
    assert torch.equal(start["x_T"], torch.randn(start["x_T"].shape, generator=g))
    torch.testing.assert_close(start["x_T"], other["x_T"], rtol=0, atol=0)


def test_an_image_size_off_the_vae_factor_is_refused(parts):
    pipe, _ = parts
    eng = engine.build(pipe, device="cpu")
    with pytest.raises(engine.InvalidInputError, match="height=15; expected a multiple of the VAE factor 2"):
        eng.run(PROMPT, image=torch.rand(1, 3, 15, 16), num_inference_steps=4)


@pytest.fixture(scope="module")
def builtin():
    return engine.build("default")


def test_builtin_model_keeps_the_image_at_half_strength_and_none_of_it_at_full(builtin):
    """`lumen generate "a red circle on a solid black background" --image white.png`: at strength
    0.5 the white input shows through the black background; at 1.0 the run is text-to-image."""
    white = np.ones((32, 32, 3), dtype=np.float32)
    prompt = "a red circle on a solid black background"

    def run(**kw):
        return builtin.run(prompt, generator=torch.Generator().manual_seed(0), output_type="pt",
                           **kw).images
    half, full, text = run(image=white, strength=0.5), run(image=white, strength=1.0), run()
    assert torch.equal(full, text)  # pixel space: no posterior draw, same noise, a = 0
    corners = (slice(None), slice(None), slice(0, 6), slice(0, 6))  # background, away from the shape
    assert float(text[corners].mean()) < 0.2 and float(half[corners].mean()) > 0.4


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(strength=0.0), engine.InvalidInputError, r"strength=0.0; expected a number in \(0.0, 1.0\]"),
    (dict(strength=1.5), engine.InvalidInputError, r"strength=1.5; expected a number in \(0.0, 1.0\]"),
    (dict(strength=0.05), engine.InvalidInputError, r"strength=0.05 with num_inference_steps=10: "
                                                    r"int\(10 \* 0.05\) = 0 steps would run"),
    (dict(height=24), engine.InvalidInputError, r"height=24 with an image of 32x32"),
    (dict(image=np.full((32, 32, 3), 1.5, np.float32)), engine.InvalidInputError,
     r"image values in \[1.5, 1.5\]; expected \[0, 1\]"),
    (dict(image=torch.full((1, 3, 32, 32), float("nan"))), engine.InvalidInputError,
     "image contains NaN or inf"),
    (dict(image=[np.zeros((32, 32, 3), np.float32)] * 2, num_images_per_prompt=3),
     engine.InvalidInputError, "2 images for 3 outputs"),
    (dict(image=torch.zeros(1, 4, 32, 32)), engine.InvalidInputError, r"expected \[N, 3, H, W\]"),
    (dict(image="white.png"), engine.InvalidTypeError, "image\\[0\\] of type str"),
    (dict(latents=torch.zeros(1, 3, 32, 32)), engine.InvalidInputError, "latents with image"),
])
def test_bad_image_input_is_refused_naming_the_value(builtin, kwargs, error, message):
    args = dict(image=np.ones((32, 32, 3), dtype=np.float32), strength=0.5, num_inference_steps=10)
    with pytest.raises(error, match=message):
        builtin.run("a red circle on a solid black background", **{**args, **kwargs})


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_sdxl_base_img2img_and_inpaint_match_diffusers(strength):
    """StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on a tiny SDXL base
    pipeline (requires_aesthetics_score off: the time ids are text-to-image's). 10 steps: T/S is
    whole, so diffusers' DDIM, which computes the previous timestep as t - T // S, steps on the
    listed timesteps as Lumen does (docs/diffusers.md#schedulers)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    from conftest import make_tiny_sdxl_pipeline

    pipe = make_tiny_sdxl_pipeline()
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 3:11, 5:13] = 1.0
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")  # as diffusers steps it
    for cls, extra in ((StableDiffusionXLImg2ImgPipeline, {}),
                       (StableDiffusionXLInpaintPipeline, {"mask_image": mask})):
        sdxl = cls(**pipe.components, requires_aesthetics_score=False)
        sdxl.set_progress_bar_config(disable=True)
        theirs = sdxl(PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength,
                      num_inference_steps=10, guidance_scale=5.0, output_type="latent",
                      generator=torch.Generator().manual_seed(2), **extra).images
        ours = eng.run(PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength,
                       num_inference_steps=10, guidance_scale=5.0, guidance_rescale=0.0,
                       generator=torch.Generator().manual_seed(2), output_type="latent", **extra).images
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_seed_gives_the_same_image_at_any_batch_size(builtin):
    """Image i draws from generator i only: a batch of three equals three runs alone."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 32, generator=g)
    mask = (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float()
    for extra in (dict(strength=0.6, eta=0.5), dict(strength=0.8, mask_image=mask, eta=0.5)):
        eng = builtin.with_config(builtin.config.replace(sampler="euler_ancestral"))
        batch = eng.run("a red circle on a solid black background", image=image, num_images_per_prompt=3,
                        generator=[torch.Generator().manual_seed(s) for s in (4, 5, 6)],
                        num_inference_steps=8, output_type="pt", **extra).images
        for k, s in enumerate((4, 5, 6)):
            alone = eng.run("a red circle on a solid black background", image=image,
                            generator=torch.Generator().manual_seed(s), num_inference_steps=8,
                            output_type="pt", **extra).images
            torch.testing.assert_close(batch[k:k + 1], alone, rtol=0, atol=2e-5)


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace", "karras"])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"])
def test_every_sampler_and_spacing_runs_the_last_steps(builtin, sampler, spacing):
    """int(10 * 0.5) = 5 steps run (the callback's count), and the result is finite."""
    eng = builtin.with_config(builtin.config.replace(sampler=sampler, timestep_spacing=spacing))
    steps = []
    out = eng.run("a red circle on a solid black background", image=np.ones((32, 32, 3), np.float32),
                  strength=0.5, num_inference_steps=10, callback=steps.append, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert steps == list(range(5)) and bool(torch.isfinite(out).all())
