"""Inpainting against diffusers' own StableDiffusionInpaintPipeline on tiny offline pipelines:
a 4-channel UNet (the kept region follows the image, noised to each step's level) and a
9-channel inpainting UNet ([latents, mask, masked-image latents] into every call)
(docs/diffusers.md#inpainting). Latents compared before decoding, to 1e-4 (tests/test_img2img.py).
"""
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionInpaintPipeline)

from lumen import engine

from conftest import make_tiny_pipeline, make_tiny_unet
from test_img2img import NEGATIVE, PROMPT, SD, ZERO_SNR

SCHEDULERS = [
    (DDIMScheduler, dict(ZERO_SNR, timestep_spacing="trailing", clip_sample=False)),
    (DDIMScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=True)),
    (EulerDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="trailing")),
    (EulerDiscreteScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                  steps_offset=1)),
    (EulerAncestralDiscreteScheduler, dict(SD, prediction_type="epsilon",
                                           timestep_spacing="leading", steps_offset=1)),
    (DPMSolverMultistepScheduler, dict(SD, prediction_type="epsilon", timestep_spacing="leading",
                                       steps_offset=1)),
]


def mask_and_image():
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0  # repaint a block, keep the rest
    return image, mask


def both(pipe, scheduler, strength, steps=10):
    image, mask = mask_and_image()
    inpaint = StableDiffusionInpaintPipeline(**{**pipe.components, "scheduler": scheduler})
    inpaint.set_progress_bar_config(disable=True)
    theirs = inpaint(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                     guidance_scale=7.5, negative_prompt=NEGATIVE, output_type="latent",
                     generator=torch.Generator().manual_seed(11)).images
    eng = engine.build(pipe, scheduler=scheduler, device="cpu")
    eta = 1.0 if isinstance(scheduler, EulerAncestralDiscreteScheduler) else 0.0
    ours = eng.run(PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask, strength=strength,
                   num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.0, eta=eta,
                   generator=torch.Generator().manual_seed(11), output_type="latent").images
    return ours, theirs, eng


@pytest.fixture(scope="module")
def pipe4():
    return make_tiny_pipeline(make_tiny_unet())


@pytest.fixture(scope="module")
def pipe9():
    return make_tiny_pipeline(make_tiny_unet(seed=4, in_channels=9))


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("cls,settings", SCHEDULERS,
                         ids=[f"{c.__name__}-{s['timestep_spacing']}" for c, s in SCHEDULERS])
def test_four_channel_model_matches_diffusers_inpaint_pipeline(pipe4, cls, settings, strength):
    ours, theirs, eng = both(pipe4, cls(**settings), strength)
    if cls is EulerDiscreteScheduler and settings["timestep_spacing"] == "trailing" and strength == 1.0:
        # diffusers' Euler starts pure noise at init_noise_sigma = sigma_max with trailing (and
        # linspace) spacing, too little noise (docs/diffusers.md); Lumen starts from unit-variance
        # VP noise. Leading spacing, where diffusers scales by sqrt(sigma_max^2 + 1), matches.
        assert float((ours - theirs).abs().max()) > 1e-2
        return
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the kept region ends on the image's own latents (its posterior sample), exactly
    image, mask = mask_and_image()
    x0 = eng.prepare(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=10,
                     generator=torch.Generator().manual_seed(11))["inpaint"]["x0"]
    kept = torch.nn.functional.interpolate(mask, size=(8, 8)) < 0.5
    assert torch.equal(ours.masked_select(kept.expand_as(ours)), x0.masked_select(kept.expand_as(x0)))


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("cls,settings", SCHEDULERS[:2],
                         ids=[f"{c.__name__}-{s['timestep_spacing']}" for c, s in SCHEDULERS[:2]])
def test_nine_channel_inpainting_unet_matches_diffusers(pipe9, cls, settings, strength):
    ours, theirs, _ = both(pipe9, cls(**settings), strength)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert float(theirs.std()) > 0.1


def test_builtin_inpaint_keeps_the_unmasked_pixels_and_repaints_the_rest():
    """Pixel space: the kept region is the input exactly; the masked square turns to the prompt."""
    eng = engine.build("default")
    grey = np.full((32, 32, 3), 0.5, dtype=np.float32)
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[:, 16:] = 1.0  # repaint the right half
    out = eng.run("a red circle on a solid black background", image=grey, mask_image=mask,
                  strength=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    left, right = out[0, :, :, :16], out[0, :, :, 16:]
    torch.testing.assert_close(left, torch.full_like(left, 0.5), rtol=0, atol=1e-6)
    assert float((right - 0.5).abs().mean()) > 0.1  # repainted, not left grey


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_image=np.zeros((16, 32), np.float32)), r"mask_image of size \(16, 32\)"),
    (dict(image=None), "mask_image without image"),
    (dict(mask_image=np.zeros((2, 1, 32, 32), np.float32)), "2 masks for 1 outputs"),
])
def test_bad_masks_are_refused_naming_the_value(kwargs, message):
    eng = engine.build("default")
    args = dict(image=np.ones((32, 32, 3), np.float32), mask_image=np.ones((32, 32), np.float32),
                num_inference_steps=4)
    with pytest.raises(engine.InvalidInputError, match=message):
        eng.run("a red circle on a solid black background", **{**args, **kwargs})


def test_nine_channel_unet_needs_image_and_mask(pipe9):
    eng = engine.build(pipe9, device="cpu")
    with pytest.raises(engine.InvalidInputError, match="in_channels=9.*expected both"):
        eng.run(PROMPT, num_inference_steps=2)


def test_image_requests_replay_from_the_loop_graph_keyed_by_inpainting_kind(pipe4, pipe9):
    """The noised start, the mask and the kept latents are static inputs: a new image or mask
    replays; the inpainting kind (none, blend, concat) and the steps run are part of the key."""
    from test_graphs import graphed

    image, mask = mask_and_image()
    for pipe, kinds in ((pipe4, ("", "blend")), (pipe9, ("concat",))):
        eager = engine.build(pipe, device="cpu")
        eng = graphed(eager)
        for k, strength in enumerate((0.5, 0.5, 1.0)):
            for kind in kinds:
                args = dict(image=image * (0.5 + 0.2 * k), strength=strength, num_inference_steps=4,
                            output_type="latent")
                if kind:
                    args["mask_image"] = mask
                graph, plain = (e.run(PROMPT, generator=torch.Generator().manual_seed(k), **args).images
                                for e in (eng, eager))
                torch.testing.assert_close(graph, plain, rtol=0, atol=0)
        keys = eng.graphs.keys()
        assert sorted({k.inpaint for k in keys}) == sorted(kinds)
        assert {k.steps for k in keys} == {2, 4}  # int(4 * 0.5) and int(4 * 1.0) steps run
        assert eng.graphs.captures == len(keys) == 2 * len(kinds)


def test_inpainting_loops_have_no_host_sync(pipe4, pipe9):
    from test_pipeline import NoHostSync

    image, mask = mask_and_image()
    for pipe in (pipe4, pipe9):
        eng = engine.build(pipe, device="cpu")
        request = eng.prepare(PROMPT, image=image, mask_image=mask, strength=0.75,
                              num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        with NoHostSync():
            out = eng.sample(**request)
        assert out.shape == (1, 4, 8, 8) and bool(torch.isfinite(out).all())


def test_nine_channel_requests_on_the_step_scheduler_and_its_step_graphs_equal_their_alone_runs(pipe9):
    """The mask and masked-image rows join each slot's UNet rows, eagerly and from step graphs."""
    from lumen.engine.graphs import GraphCache
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import Job

    from test_step_graphs import capture_by_rerun

    eng = engine.build(pipe9, scheduler=DDIMScheduler(**SCHEDULERS[0][1]), device="cpu")
    image, mask = mask_and_image()
    args = [dict(strength=s, num_inference_steps=n, guidance_scale=w)
            for s, n, w in ((0.5, 6, 7.5), (1.0, 4, 1.0), (0.75, 8, 5.0))]
    for graphs in (None, GraphCache(8, capture=capture_by_rerun)):
        batcher = Batcher(eng, max_batch=8, batch_wait_ms=200, output_type="latent", step_graphs=graphs)
        try:
            futures = [batcher.submit(Job.prepared(eng.prepare(
                PROMPT, image=image, mask_image=mask, generator=torch.Generator().manual_seed(i), **a)))
                for i, a in enumerate(args)]
            results = [f.result(timeout=120) for f in futures]
        finally:
            batcher.stop()
        for i, (a, got) in enumerate(zip(args, results)):
            want = eng.run(PROMPT, image=image, mask_image=mask, output_type="latent",
                           generator=torch.Generator().manual_seed(i), **a).images
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert graphs is None or graphs.captures >= 1


def test_masked_content_noise_starts_the_masked_region_from_noise_and_keeps_the_rest():
    eng = engine.build("default")
    grey = np.full((32, 32, 3), 0.5, dtype=np.float32)
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[:, 16:] = 1.0
    prompt = "a red circle on a solid black background"

    def run(strength=0.5, **kw):
        return eng.run(prompt, image=grey, mask_image=mask, strength=strength, output_type="pt",
                       generator=torch.Generator().manual_seed(0), **kw).images
    original, noise = run(), run(masked_content="noise")
    assert torch.equal(original[..., :16], noise[..., :16])  # the kept half: the image in both
    assert float((original - noise)[..., 16:].abs().mean()) > 0.05
    # at strength 1 the whole start is noise either way: the same draws, the same image
    assert torch.equal(run(1.0), run(1.0, masked_content="noise"))
    with pytest.raises(engine.InvalidInputError, match="masked_content='blur'; expected one of"):
        run(masked_content="blur")
    with pytest.raises(engine.InvalidInputError, match="masked_content='noise' without mask_image"):
        eng.run(prompt, image=grey, masked_content="noise")
