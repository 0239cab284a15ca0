"""ControlNet against diffusers' own ControlNet pipelines: the same tiny models, scheduler and
seed give the same latents to 1e-4 (docs/api.md#controlnet). Runs have 5 steps: with trailing
spacing, diffusers' DDIM steps to t - T // S, which is the next listed timestep only when S
divides T (docs/diffusers.md)."""
import pytest
import torch

from lumen import engine

from conftest import make_tiny_pipeline, make_tiny_unet

PROMPT, NEGATIVE = "a cat", "a dog"
SIZE = 64  # pixels: the tiny VAE's factor 2 gives 32x32 latents


def make_controlnet(unet, seed: int):
    """ControlNetModel.from_unet with a small conditioning embedding (factor 2, as the tiny
    VAE's), its zero-initialised convs given random weights so that the control matters."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        zero = [*net.controlnet_down_blocks, net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out]
        for conv in zero:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def parts():
    unet = make_tiny_unet(seed=7)
    pipe = make_tiny_pipeline(unet)
    nets = [make_controlnet(unet, 11), make_controlnet(unet, 12)]
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in nets]
    return pipe, nets, images


def theirs(pipe, nets, images, steps=5, **kw):
    from diffusers import StableDiffusionControlNetPipeline

    control = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        controlnet=nets[0] if len(nets) == 1 else nets, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    control.set_progress_bar_config(disable=True)
    return control(PROMPT, negative_prompt=NEGATIVE, image=images[0] if len(nets) == 1 else images,
                   num_inference_steps=steps, guidance_scale=7.5, height=SIZE, width=SIZE,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


def ours(eng, images, steps=5, **kw):
    if images:
        kw["control_image"] = images[0] if len(images) == 1 else images
    return eng.run(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.0,
                   height=SIZE, width=SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kw).images


CASES = [  # (ControlNets, run arguments): diffusers' argument names and semantics
    (1, {}),
    (1, dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7)),
    (1, dict(guess_mode=True)),
    (2, dict(controlnet_conditioning_scale=[0.8, 1.3])),
    (2, dict(control_guidance_start=[0.0, 0.5], control_guidance_end=[0.5, 1.0])),
]


@pytest.mark.parametrize("count,kw", CASES)
def test_matches_stable_diffusion_controlnet_pipeline(parts, count, kw):
    pipe, nets, images = parts
    nets, images = nets[:count], images[:count]
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    got, want = ours(eng, images, **kw), theirs(pipe, nets, images, **kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    plain = engine.build(pipe, scheduler=pipe.scheduler, device="cpu").run(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
        guidance_rescale=0.0, height=SIZE, width=SIZE, output_type="latent",
        generator=torch.Generator().manual_seed(0)).images
    assert float((got - plain).abs().max()) > 1e-2  # the control changed the result


@pytest.mark.parametrize("mode,strength", [("img2img", 0.75), ("inpaint", 0.75), ("inpaint9", 0.75),
                                           ("inpaint9", 1.0)])
def test_matches_the_controlnet_img2img_and_inpaint_pipelines(parts, mode, strength):
    """ControlNet with image-to-image and inpainting: diffusers'
    StableDiffusionControlNetImg2ImgPipeline and ...InpaintPipeline, 10 steps, a scale and a
    window (which counts the steps that run). "inpaint9": a 9-channel inpainting UNet, whose
    ControlNet (4 input channels, as inpainting checkpoints pair with) sees the latents alone."""
    from diffusers import (StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetInpaintPipeline)

    pipe, nets, _ = parts
    if mode == "inpaint9":
        pipe = make_tiny_pipeline(make_tiny_unet(seed=8, in_channels=9))
    g = torch.Generator().manual_seed(9)
    image, control = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 16, 16, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    extra = dict(mask_image=mask) if mode != "img2img" else {}
    cls = StableDiffusionControlNetInpaintPipeline if mode != "img2img" else \
        StableDiffusionControlNetImg2ImgPipeline
    theirs = cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                 unet=pipe.unet, controlnet=nets[0], scheduler=pipe.scheduler, safety_checker=None,
                 feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(strength=strength, num_inference_steps=10, guidance_scale=7.5,
              controlnet_conditioning_scale=0.8, control_guidance_start=0.1,
              control_guidance_end=0.8, output_type="latent", **extra)
    want = theirs(PROMPT, negative_prompt=NEGATIVE, image=image, control_image=control,
                  generator=torch.Generator().manual_seed(11), **kw).images
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets[0])
    got = eng.run(PROMPT, negative_prompt=NEGATIVE, image=image, control_image=control,
                  guidance_rescale=0.0, generator=torch.Generator().manual_seed(11), **kw).images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_pipeline_with_a_controlnet_brings_it(parts):
    """engine.build of a StableDiffusionControlNetPipeline object runs its ControlNet."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe, nets, images = parts
    control = StableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": nets[0]})
    eng = engine.build(control, scheduler=pipe.scheduler, device="cpu")
    assert eng.components.controlnets == (nets[0],)
    torch.testing.assert_close(ours(eng, images[:1]), theirs(pipe, nets[:1], images[:1]),
                               rtol=1e-4, atol=1e-4)


def test_the_loop_replays_from_a_graph_keyed_by_the_controlnet_count(parts):
    """Control images and scales are graph inputs: another image or window replays the graph
    and equals the eager run; guess mode and a second ControlNet are other keys."""
    from test_graphs import graphed

    pipe, nets, images = parts
    eager = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    eng = graphed(eager)
    other = [torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))] * 2
    for imgs, kw in ((images, {}), (other, dict(control_guidance_start=[0.4, 0.0])),
                     (images, dict(guess_mode=True))):
        torch.testing.assert_close(ours(eng, imgs, **kw), ours(eager, imgs, **kw), rtol=0, atol=0)
    keys = sorted((k.controlnets, k.guess_mode) for k in eng.graphs.keys())
    assert keys == [((0, 1), False), ((0, 1), True)]
    assert (eng.graphs.captures, eng.graphs.replays) == (2, 3)


def test_the_controlled_loop_has_no_host_sync(parts):
    from test_pipeline import NoHostSync

    pipe, nets, images = parts
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    request = eng.prepare(PROMPT, control_image=images, num_inference_steps=5, height=SIZE,
                          width=SIZE, control_guidance_end=[0.5, 1.0],
                          generator=torch.Generator().manual_seed(0))
    with NoHostSync():
        out = eng.sample(**request)
    assert bool(torch.isfinite(out).all())


def test_bad_controlnet_input_is_refused_naming_the_value(parts):
    pipe, nets, images = parts
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    cases = [
        (dict(control_image=[images[0][..., :32, :32]] * 2), r"control image 0 is 32x32 .* 64x64"),
        (dict(control_image=images[0]), "1 control images for 2 ControlNets"),
        (dict(control_image=images, controlnet_conditioning_scale=[1.0, 1.0, 1.0]),
         "controlnet_conditioning_scale has 3 values for 2 ControlNets"),
        (dict(control_image=images, control_guidance_start=0.8, control_guidance_end=0.3),
         r"control_guidance_start=0.8 > control_guidance_end=0.3"),
        (dict(control_image=images, controlnet_conditioning_scale=float("nan")),
         "controlnet_conditioning_scale=nan"),
        (dict(control_image=[None, None]), r"control_image=\[None, None\]; expected an image"),
        (dict(control_image=images, cache_interval=2), "cache_interval=2 with ControlNet"),
    ]
    for kw, message in cases:
        with pytest.raises(engine.InvalidInputError, match=message):
            eng.run(PROMPT, num_inference_steps=5, height=SIZE, width=SIZE, **kw)
    encoded = []  # scales, windows and DeepCache are refused before the text encoder runs
    hook = pipe.text_encoder.register_forward_hook(lambda *a: encoded.append(1))
    try:
        for kw, _ in cases[2:5] + cases[-1:]:
            with pytest.raises(engine.InvalidInputError):
                eng.prepare(PROMPT, num_inference_steps=5, height=SIZE, width=SIZE, **kw)
        assert not encoded
        eng.prepare(PROMPT, num_inference_steps=5, height=SIZE, width=SIZE, control_image=images)
        assert encoded  # the hook sees the engine's text encoder
    finally:
        hook.remove()
    with pytest.raises(engine.InvalidInputError, match="control_image on an engine without a ControlNet"):
        engine.build(pipe, device="cpu").run(PROMPT, control_image=images[0], num_inference_steps=5)
    wide = make_controlnet(make_tiny_unet(cross_attention_dim=64), 1)
    with pytest.raises(engine.InvalidInputError, match="ControlNet 0 has cross_attention_dim=64, the UNet 32"):
        engine.build(pipe, device="cpu", controlnet=wide)
    other = make_controlnet(make_tiny_unet(block_out_channels=(32, 32)), 1)
    with pytest.raises(engine.InvalidInputError, match=r"ControlNet 1 has block_out_channels=\[32, 32\]"):
        engine.build(pipe, device="cpu", controlnet=[nets[0], other])
    with pytest.raises(engine.InvalidTypeError, match="controlnet item 0 of type int"):
        engine.build(pipe, device="cpu", controlnet=3)


def test_a_request_may_leave_controlnets_out(parts):
    """control_image None for one of two ControlNets runs the other alone (as an engine built
    with that one); no control_image at all runs the plain loop."""
    pipe, nets, images = parts
    both = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    second = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets[1])
    torch.testing.assert_close(ours(both, [None, images[1]]), ours(second, images[1:]),
                               rtol=0, atol=0)
    plain = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    kw = dict(num_inference_steps=5, height=SIZE, width=SIZE, output_type="latent")
    torch.testing.assert_close(both.run(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images,
                               plain.run(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images,
                               rtol=0, atol=0)


def test_sdxl_matches_stable_diffusion_xl_controlnet_pipeline():
    """An SDXL ControlNet (text_time added conditioning, pooled embeddings and time ids passed
    to the ControlNet too) on a tiny SDXL pipeline, against StableDiffusionXLControlNetPipeline."""
    from diffusers import StableDiffusionXLControlNetPipeline

    from conftest import make_tiny_sdxl_pipeline

    sdxl = make_tiny_sdxl_pipeline()
    net = make_controlnet(sdxl.unet, 13)
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    theirs_pipe = StableDiffusionXLControlNetPipeline(**{**sdxl.components, "controlnet": net})
    theirs_pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=5, guidance_scale=7.5, controlnet_conditioning_scale=0.7,
              control_guidance_end=0.6, output_type="latent")
    want = theirs_pipe(PROMPT, negative_prompt=NEGATIVE, image=control,
                       generator=torch.Generator().manual_seed(0), **kw).images
    eng = engine.build(sdxl, scheduler=sdxl.scheduler, device="cpu", controlnet=net)
    got = eng.run(PROMPT, negative_prompt=NEGATIVE, control_image=control, guidance_rescale=0.0,
                  generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# Latents of the tiny pipeline through ControlNets with random output convolutions: the rows
# of a UNet call round differently with the call's row count (docs/serving.md#the-step-scheduler),
# measured up to 2.5e-5 here after 6 steps, so the bound is the soak test's 1e-4.
LATENT_ATOL = 1e-4


def test_scheduled_controlnet_images_equal_their_alone_runs(parts):
    """In the step scheduler, images with ControlNets (one, the other, both; guess mode; their
    own windows and scales), images without, and images with DeepCache share ticks, each at its
    own step; every image equals its alone run (to the batch-size rounding of the scheduler's
    tests)."""
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import Job

    pipe, nets, images = parts
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    cases = [  # run arguments besides the prompt and seed
        dict(control_image=images, num_inference_steps=5),
        dict(control_image=[None, images[1]], num_inference_steps=4, controlnet_conditioning_scale=0.5,
             guidance_scale=1.0),
        dict(num_inference_steps=6),
        dict(control_image=[images[0], None], guess_mode=True, num_inference_steps=5,
             control_guidance_start=0.3),
        dict(num_inference_steps=6, cache_interval=2),
        dict(control_image=images, num_inference_steps=3, controlnet_conditioning_scale=[1.5, 0.4],
             control_guidance_end=[1.0, 0.5]),
    ]
    base = dict(height=SIZE, width=SIZE, guidance_scale=7.5, guidance_rescale=0.5)
    requests = [{**base, **c} for c in cases]
    jobs = []
    for i, kw in enumerate(requests):
        job = Job.prepared(eng.prepare(PROMPT, negative_prompt=NEGATIVE,
                                       generator=torch.Generator().manual_seed(i), **kw))
        jobs.append(job)
    rows = []
    hook = nets[0].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=300, output_type="latent")
    try:
        results = [f.result(timeout=120) for f in [batcher.submit(j) for j in jobs]]
    finally:
        batcher.stop()
        hook.remove()
    assert max(rows) >= 4  # ControlNet 0 ran over several images' rows at once
    for i, (kw, got) in enumerate(zip(requests, results)):
        want = eng.run(PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(i),
                       output_type="latent", **kw).images
        torch.testing.assert_close(got, want, rtol=0, atol=LATENT_ATOL)



def test_scheduled_controlnet_runs_at_half_precision_as_engine_run_does():
    """At bf16 the scheduler's per-row scales stay fp32 and round once to the residuals' dtype,
    as diffusers' scalar scale does in Engine.run: the image is the same (a bf16-rounded scale
    moved the latents by 0.096; an fp32 one promoted the residuals and the UNet refused them)."""
    from lumen.benchmarks.controlnet import control_for
    from lumen.engine.builtin.train_controlnet import control_images
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import Job

    prompt = "a red circle on a solid black background"
    eng = engine.build("default", controlnet="default", dtype=torch.bfloat16)
    image = control_images(control_for(prompt, 1, 5))
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=0, output_type="latent")
    try:
        for i, kw in enumerate((dict(controlnet_conditioning_scale=0.7), dict(guess_mode=True))):
            kw = dict(control_image=image, num_inference_steps=6, **kw)
            job = Job.prepared(eng.prepare(prompt, generator=torch.Generator().manual_seed(i), **kw))
            got = batcher.submit(job).result(timeout=120)
            want = eng.run(prompt, generator=torch.Generator().manual_seed(i), output_type="latent",
                           **kw).images
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    finally:
        batcher.stop()

def png_b64(tensor) -> str:
    import base64
    import io

    from PIL import Image

    array = (tensor[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_server_takes_a1111_controlnet_units_and_openai_control_images(parts):
    """A1111's ControlNet extension payload (alwayson_scripts.controlnet.args) and the OpenAI
    body's control_image reach the engine: the images equal Engine.run's with the same control
    (8-bit PNG: one level); the extension's listings answer; bad units are 422s naming the field,
    and the server keeps serving."""
    import base64
    import io

    import httpx
    import numpy as np
    from openai import OpenAI
    from PIL import Image

    from server_helpers import RunningServer

    pipe, nets, _ = parts
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    g = torch.Generator().manual_seed(21)
    control = (torch.rand(1, 3, 16, 16, generator=g) * 255).round() / 255  # exact in a PNG
    wide = (torch.rand(1, 3, 16, 32, generator=g) * 255).round() / 255

    def want(seed, **kw):
        image = eng.run(PROMPT, negative_prompt="", num_inference_steps=5, guidance_scale=7.0,
                        guidance_rescale=0.7, generator=torch.Generator().manual_seed(seed),
                        height=16, width=16, output_type="np", **kw).images[0]
        return np.round(image * 255).astype(np.int16)

    def got(b64):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)

    server = RunningServer(eng, batch_wait_ms=5, max_pixels=64 * 64, controlnet_names=["edges", "depth"])
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            titles = client.get("/controlnet/model_list").json()["model_list"]
            assert [t.split(" [")[0] for t in titles] == ["edges", "depth"] and len(titles[0]) == 16
            assert client.get("/controlnet/module_list").json()["module_list"] == ["none", "canny"]
            assert client.get("/controlnet/version").json() == {"version": 2}
            unit = {"enabled": True, "image": png_b64(control), "module": "none", "model": titles[1],
                    "weight": 0.8, "guidance_start": 0.0, "guidance_end": 0.6,
                    "control_mode": "Balanced", "pixel_perfect": False, "resize_mode": "Crop and Resize"}
            body = {"prompt": PROMPT, "seed": 4, "steps": 5, "cfg_scale": 7.0, "width": 16,
                    "height": 16, "sampler_name": "DDIM",
                    "alwayson_scripts": {"controlnet": {"args": [unit, {"enabled": False}]}}}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            expected = want(4, control_image=[None, control], controlnet_conditioning_scale=[0, 0.8],
                            control_guidance_end=[1, 0.6])
            assert np.abs(got(r.json()["images"][0]) - expected).max() <= 1
            assert np.abs(got(r.json()["images"][0]) - want(4)).max() > 1  # the control mattered
            expected_a1111 = expected
            # a wider image is centre-cropped to the output (A1111's "Crop and Resize")
            r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
                "args": [{**unit, "image": png_b64(wide), "model": "depth"}]}}})
            cropped = wide[..., 8:24]
            assert np.abs(got(r.json()["images"][0]) - want(
                4, control_image=[None, cropped], controlnet_conditioning_scale=[0, 0.8],
                control_guidance_end=[1, 0.6])).max() <= 1
            canny = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
                "args": [{**unit, "module": "canny"}]}}})
            assert canny.status_code == 200, canny.text
            bad = [({"model": "nope"}, "model", "expected a loaded ControlNet"),
                   ({"module": "depth_midas"}, "module", "needs a preprocessor model"),
                   ({"control_mode": "My prompt is more important"}, "control_mode", "expected one of"),
                   ({"image": "not base64!"}, "image", "not valid base64"),
                   ({"guidance_start": 0.9, "guidance_end": 0.2}, "guidance_start",
                    "args[0].guidance_start=0.9 > alwayson_scripts.controlnet.args[0].guidance_end=0.2"),
                   ({"weight": -1}, "weight", "args[0].weight=-1.0; expected a number in [0, inf]")]
            for change, field, words in bad:
                r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {
                    "controlnet": {"args": [{**unit, **change}]}}})
                assert r.status_code == 422 and words in r.json()["error"]["message"], r.text
                assert r.json()["error"]["param"] == f"alwayson_scripts.controlnet.args[0].{field}"
            r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {
                "controlnet": {"args": [unit, unit]}}})  # two units, one ControlNet
            assert r.status_code == 422 and "expected each ControlNet once" in r.text
            assert r.json()["error"]["param"] == "alwayson_scripts.controlnet.args[1].model"
            other = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"adetailer": {}}})
            assert other.status_code == 422 and other.json()["error"]["param"] == "alwayson_scripts"
        import webuiapi  # the A1111 client, with its own ControlNetUnit

        a1111 = webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")
        assert a1111.controlnet_model_list() == titles and a1111.controlnet_version() == 2
        pil = Image.open(io.BytesIO(base64.b64decode(png_b64(control))))
        # webuiapi writes the units into alwayson_scripts, whose default is one shared dict:
        # pass a fresh one, or every later txt2img of this process would carry them
        result = a1111.txt2img(prompt=PROMPT, seed=4, steps=5, cfg_scale=7.0, width=16, height=16,
                               sampler_name="DDIM", eta=0.0, alwayson_scripts={},
                               controlnet_units=[webuiapi.ControlNetUnit(
                                   image=pil, model="depth", weight=0.8, guidance_end=0.6)])
        assert np.abs(np.asarray(result.image.convert("RGB")).astype(np.int16) - expected_a1111).max() <= 1
        api = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        result = api.images.generate(prompt=PROMPT, size="16x16", response_format="b64_json",
                                     extra_body={"num_inference_steps": 5, "seed": 6,
                                                 "guidance_scale": 7.0, "sampler": "ddim",
                                                 "negative_prompt": "", "controlnet": "edges",
                                                 "control_image": png_b64(control),
                                                 "controlnet_conditioning_scale": 1.2})
        expected = want(6, control_image=[control, None], controlnet_conditioning_scale=[1.2, 0])
        assert np.abs(got(result.data[0].b64_json) - expected).max() <= 1
        with httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "16x16",
                                                            "control_image": png_b64(control)})
            assert r.status_code == 422 and r.json()["error"]["param"] == "control_image"
            assert "1 control images for 2 ControlNets" in r.json()["error"]["message"]
            r = client.post("/v1/images/generations", json={  # one ControlNet, two images
                "prompt": PROMPT, "size": "16x16", "controlnet": ["edges", "edges"],
                "control_image": [png_b64(control)] * 2})
            assert r.status_code == 422 and r.json()["error"]["param"] == "controlnet[1]", r.text
            assert "expected each ControlNet once" in r.json()["error"]["message"]
            for field, value, words in (
                    ("controlnet_conditioning_scale", [1.0, -2.0], "=-2.0; expected a number in [0, inf]"),
                    ("control_guidance_end", 1.5, "control_guidance_end=1.5; expected a number in [0, 1]"),
                    ("control_guidance_start", [0.1, 0.2, 0.3], "has 3 values for 2 ControlNets")):
                r = client.post("/v1/images/generations", json={
                    "prompt": PROMPT, "size": "16x16", field: value,
                    "control_image": [png_b64(control)] * 2})
                assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
                assert words in r.json()["error"]["message"], r.text
            assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # still serving
    finally:
        server.stop()


def test_generate_takes_controlnet_folders_and_control_images(parts, tmp_path, capsys):
    """`lumen generate --controlnet FOLDER --control-image PNG` on a local pipeline folder: the
    PNG equals Engine.run's image with the same control."""
    import numpy as np
    from PIL import Image

    from lumen.cli import main

    pipe, nets, images = parts
    pipe.save_pretrained(tmp_path / "model")
    nets[0].save_pretrained(tmp_path / "edges")
    control = (images[0][..., :16, :16] * 255).round() / 255
    Image.fromarray((control[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(
        tmp_path / "control.png")
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(tmp_path / "model"), "--controlnet",
                 str(tmp_path / "edges"), "--control-image", str(tmp_path / "control.png"),
                 "--control-scale", "0.7", "--control-end", "0.8", "--steps", "5", "--height", "16",
                 "--width", "16", "--rescale", "0", "-o", str(out)]) == 0
    eng = engine.build(pipe, device="cpu", controlnet=nets[0])
    want = eng.run(PROMPT, num_inference_steps=5, guidance_rescale=0.0, height=16, width=16,
                   control_image=control, controlnet_conditioning_scale=0.7,
                   control_guidance_end=0.8, generator=torch.Generator().manual_seed(0),
                   output_type="np").images[0]
    got = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert np.abs(got - np.round(want * 255)).max() <= 1
    assert main(["generate", PROMPT, "--model", str(tmp_path / "model"), "--controlnet",
                 str(tmp_path / "edges"), "--control-image", str(tmp_path / "control.png"),
                 "--steps", "5", "--height", "32", "--width", "32", "-o", str(out)]) == 2
    assert "control image 0 is 16x16 (height x width); expected the output's 32x32" in \
        capsys.readouterr().err


def test_onnxruntime_runs_exported_controlnets_beside_a_unet_with_residual_inputs(parts, tmp_path):
    """backend='onnxruntime': each ControlNet is exported to its own graph and the UNet with
    residual inputs (zeros for a request without control); the images equal the torch backend's,
    with one and two ControlNets, a window and guess mode, and in the step scheduler, whose
    calls on this backend go one timestep at a time."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import Job

    pipe, nets, images = parts
    ort = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", backend="onnxruntime",
                       controlnet=nets, backend_options={"cache_dir": tmp_path})
    ref = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    assert type(ort.control_runners[0]).__name__ == "OrtControlNet"
    cases = [dict(control_image=[images[0], None]), dict(control_image=images,
             control_guidance_start=[0.0, 0.4], controlnet_conditioning_scale=[0.7, 1.2]),
             dict(control_image=images, guess_mode=True), {}]
    for kw in cases:
        torch.testing.assert_close(ours(ort, [], **kw) if "control_image" in kw else
                                   ours_plain(ort), ours(ref, [], **kw) if "control_image" in kw
                                   else ours_plain(ref), rtol=1e-4, atol=1e-4)
    requests = [dict(control_image=images, num_inference_steps=5),
                dict(control_image=[None, images[1]], num_inference_steps=3, guess_mode=True)]
    jobs = [Job.prepared(ort.prepare(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                                     generator=torch.Generator().manual_seed(i), **kw))
            for i, kw in enumerate(requests)]
    batcher = Batcher(ort, max_batch=4, batch_wait_ms=300, output_type="latent")
    try:
        results = [f.result(timeout=120) for f in [batcher.submit(j) for j in jobs]]
    finally:
        batcher.stop()
    for i, (kw, got) in enumerate(zip(requests, results)):
        want = ref.run(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                       generator=torch.Generator().manual_seed(i), output_type="latent", **kw).images
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_tensorrt_profiles_fit_the_exported_controlnet_and_unet_graphs(parts, tmp_path):
    """TensorRT cannot run here; what a build would give it can be checked. At the min, opt and
    max of a ControlNet's profile (the UNet engine's, batches from 1) the profile sets exactly
    the exported graph's inputs but the 0-dim timestep, at their ranks; onnxruntime runs the
    graph at each of those shapes, and the residuals it gives have the shapes the UNet engine's
    profile sets for its residual inputs."""
    import numpy as np
    import onnx

    from lumen.export.cache import ArtifactCache
    from lumen.export.controlnet_export import ControlSignature, control_profile, export_cached
    from lumen.export.onnx_export import UNetSignature
    from lumen.export.ort_backend import make_session
    from lumen.export.trt_backend import Profile

    pipe, nets, _ = parts
    path, _ = export_cached(nets[0], ArtifactCache(tmp_path), dtype=torch.float32)
    unet_profile = Profile((2, 8, 8), (2, 16, 16), (4, 32, 24), seq=(77, 77, 154))
    profile = control_profile(unet_profile)
    assert (profile.min, profile.opt, profile.max) == ((1, 8, 8), (2, 16, 16), (4, 32, 24))
    sig = ControlSignature.of(nets[0].config)
    shapes = profile.input_shapes(sig)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(str(path)).graph.input}
    assert set(ranks) == {"timestep", *shapes} and ranks["timestep"] == 0
    assert shapes["controlnet_cond"] == ((1, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 48))
    unet = unet_profile.input_shapes(UNetSignature.of(pipe.unet.config, residuals=True))
    session = make_session(path, torch.device("cpu"), torch.float32)
    for level in range(3):
        feeds = {name: np.random.rand(*s[level]).astype(np.float32) for name, s in shapes.items()}
        assert all(v.ndim == ranks[name] for name, v in feeds.items())
        outs = session.run(list(sig.output_names), {**feeds, "timestep": np.array(500, dtype=np.float32)})
        batch = shapes["sample"][level][0]
        assert [o.shape for o in outs] == [(batch, *unet[name][level][1:]) for name in sig.output_names]
        assert shapes["sample"][level][1:] == unet["sample"][level][1:]


def test_exported_controlnets_refuse_bad_input_early(parts, tmp_path):
    """A control image of the wrong size or dtype is an error naming the shape, not an
    onnxruntime crash; TensorRT without TensorRT, and bfloat16 with an exported ControlNet, are
    refused before anything is exported."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    from lumen.engine.errors import BackendUnavailableError
    from lumen.export.controlnet_export import load_controlnet_runner

    pipe, nets, _ = parts
    runner = load_controlnet_runner(nets[0], device="cpu", dtype=torch.float32,
                                    cache_dir=tmp_path / "ok")
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(500.0), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        want = nets[0](x, t, e, cond, return_dict=False)
    torch.testing.assert_close(runner(x, t, e, cond), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(engine.InvalidInputError,
                       match=r"controlnet_cond of shape \(2, 3, 8, 8\); this ControlNet takes "
                             r"\(2, 3, 16, 16\)"):
        runner(x, t, e, torch.rand(2, 3, 8, 8))
    with pytest.raises(engine.InvalidInputError, match="sample dtype torch.float16"):
        runner(x.half(), t, e, torch.rand(2, 3, 16, 16))
    with pytest.raises(engine.InvalidInputError, match="latent size 7x8"):
        runner(x[..., :7, :], t, e, torch.rand(2, 3, 14, 16))
    if not tensorrt_present():
        with pytest.raises(BackendUnavailableError, match="'onnxruntime' or 'torch'"):
            load_controlnet_runner(nets[0], "tensorrt", device="cpu", dtype=torch.float32,
                                   cache_dir=tmp_path / "trt")
        assert not (tmp_path / "trt").exists() or not any((tmp_path / "trt").iterdir())
    with pytest.raises(engine.InvalidInputError, match="dtype bfloat16 with an exported ControlNet"):
        engine.build(pipe, device="cpu", dtype=torch.bfloat16, backend="onnxruntime",
                     controlnet=nets, backend_options={"cache_dir": tmp_path / "bf16"})
    assert not (tmp_path / "bf16").exists() or not any((tmp_path / "bf16").iterdir())


def test_an_exported_pooled_controlnet_broadcasts_its_residuals_as_torch_does(parts, tmp_path):
    """A ControlNet with global_pool_conditions (e.g. shuffle) returns [B, C, 1, 1] residuals,
    which the UNet broadcasts: its exported graph's outputs have that shape (the runner's
    buffers must too, or TensorRT would fill a few values of a larger uninitialised one), and
    the onnxruntime engine's image equals the torch backend's."""
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    from diffusers import ControlNetModel

    from lumen.export.controlnet_export import load_controlnet_runner

    pipe, nets, images = parts
    pooled = ControlNetModel.from_config(nets[0].config, global_pool_conditions=True)
    pooled.load_state_dict(nets[0].state_dict())
    pooled.eval()
    runner = load_controlnet_runner(pooled, device="cpu", dtype=torch.float32,
                                    cache_dir=tmp_path)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor(500.0), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 16, 16)
    graph = runner._run({"sample": x, "timestep": t, "encoder_hidden_states": e,
                         "controlnet_cond": cond}, x)
    assert [tuple(o.shape) for o in graph] == [(2, c, 1, 1) for c in (32, 32, 32, 64, 64)]
    # the buffers the CUDA runners bind (IOBinding, TensorRT) are the graph's outputs
    assert [o.shape for o in runner.signature.outputs_like(x)] == [o.shape for o in graph]
    down, mid = runner(x, t, e, cond)
    assert tuple(down[-1].shape) == (2, 64, 4, 4) and tuple(mid.shape) == (2, 64, 4, 4)
    ort = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", backend="onnxruntime",
                       controlnet=pooled, backend_options={"cache_dir": tmp_path})
    ref = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=pooled)
    want = ours(ref, images[:1])
    torch.testing.assert_close(ours(ort, images[:1]), want, rtol=1e-4, atol=1e-4)
    assert (want - ours_plain(ref)).abs().max() > 1e-2  # the pooled control changes the image


def test_lumen_build_prebuilds_the_controlnets_engine_build_then_finds(parts, tmp_path, capsys):
    """`lumen build MODEL --controlnet FOLDER` exports the UNet with residual inputs and each
    ControlNet; engine.build with the same ControlNet then finds every artifact in the cache
    and makes none."""
    from lumen.cli import main

    pipe, nets, images = parts
    pipe.save_pretrained(tmp_path / "model")
    nets[1].save_pretrained(tmp_path / "edges")
    cache = tmp_path / "cache"
    args = ["build", str(tmp_path / "model"), "--backend", "onnxruntime", "--dtype", "float32",
            "--device", "cpu", "--opt", "2x64x64", "--controlnet", str(tmp_path / "edges"),
            "--cache-dir", str(cache)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "onnxruntime artifact (built)" in err and "ControlNet 0 onnxruntime artifact (built)" in err
    made = sorted(p.name for p in cache.iterdir())
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # UNet and ControlNet entries
    eng = engine.build(str(tmp_path / "model"), device="cpu", dtype=torch.float32,
                       backend="onnxruntime", controlnet=str(tmp_path / "edges"),
                       backend_options={"cache_dir": cache})
    assert sorted(p.name for p in cache.iterdir()) == made
    ref = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets[1])
    torch.testing.assert_close(ours(eng.with_config(ref.config), images[1:]),
                               ours(ref, images[1:]), rtol=1e-4, atol=1e-4)
    assert main(args) == 0
    assert "ControlNet 0 onnxruntime artifact (cache hit)" in capsys.readouterr().err


def tensorrt_present() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")  # tensorrt-stubs alone imports as an empty package


@pytest.mark.skipif(not (torch.cuda.is_available() and tensorrt_present()),
                    reason="TensorRT engines need the tensorrt package and a CUDA GPU")
def test_tensorrt_runs_controlnet_engines_beside_the_unet_engine(parts, tmp_path):
    """backend='tensorrt': each ControlNet's engine beside the residual-input UNet engine gives
    the torch backend's latents (TensorRT may use TF32 in fp32 networks: 2e-2), eagerly and
    replayed from the whole-loop graph (the same engines: 1e-4), with guess mode's half batch."""
    import copy

    pipe, nets, images = copy.deepcopy(parts)
    options = {"cache_dir": tmp_path, "min_shape": (1, 32, 32), "opt_shape": (2, 32, 32),
               "max_shape": (2, 32, 32)}
    trt = engine.build(pipe, scheduler=pipe.scheduler, device="cuda", dtype=torch.float32,
                       backend="tensorrt", controlnet=nets, backend_options=options,
                       cuda_graph=False)
    assert type(trt.control_runners[0]).__name__ == "TrtControlNet"
    ref = engine.build(pipe, scheduler=pipe.scheduler, device="cuda", dtype=torch.float32,
                       controlnet=nets, cuda_graph=False)
    graphed = engine.Engine(trt.components, trt.config, trt.runner, trt.device, trt.dtype,
                            "tensorrt", cuda_graph=True, control_runners=trt.control_runners)
    for kw in ({}, dict(guess_mode=True),
               dict(control_guidance_start=[0.0, 0.4], controlnet_conditioning_scale=[0.7, 1.2])):
        got = ours(trt, images, **kw)
        torch.testing.assert_close(got, ours(ref, images, **kw), rtol=0, atol=2e-2)
        torch.testing.assert_close(ours(graphed, images, **kw), got, rtol=0, atol=1e-4)
    assert graphed.graphs.captures == 3


class PerGraph:
    """A ControlNet runner with per-graph state, as TensorRT's is (TrtControlNet.for_graph):
    a captured loop or step must call its own instance, never the engine's."""

    def __init__(self, net, made: list):
        self.net, self.config, self.made, self.calls = net, net.config, made, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        return self.net(*args, **kw)

    def for_graph(self):
        self.made.append(PerGraph(self.net, self.made))
        return self.made[-1]


def test_captured_loops_and_step_graphs_call_their_own_controlnet_runners(parts):
    """The whole-loop graph and the step scheduler's step graphs take per-graph ControlNet
    runners (for_graph) as they take the UNet's, and their images equal the eager engine's."""
    from lumen.engine.graphs import GraphCache
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import Job

    from test_graphs import capture_by_rerun
    from test_step_graphs import capture_by_rerun as capture_step_by_rerun

    pipe, nets, images = parts
    eager = engine.build(pipe, scheduler=pipe.scheduler, device="cpu", controlnet=nets)
    made: list = []
    own = tuple(PerGraph(net, made) for net in nets)
    eng = engine.Engine(eager.components, eager.config, eager.runner, eager.device, eager.dtype,
                        cuda_graph=True, graphs=GraphCache(4, capture=capture_by_rerun),
                        control_runners=own)
    torch.testing.assert_close(ours(eng, images), ours(eager, images), rtol=0, atol=0)
    assert len(made) == 2 and all(r.calls > 0 for r in made) and [r.net for r in made] == nets
    graphs = GraphCache(8, capture=capture_step_by_rerun)
    batcher = Batcher(eng, max_batch=4, batch_wait_ms=300, output_type="latent", step_graphs=graphs)
    requests = [dict(control_image=images), dict(control_image=[None, images[1]], guess_mode=True)]
    try:
        futures = [batcher.submit(Job.prepared(eng.prepare(
            PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=5,
            generator=torch.Generator().manual_seed(i), **kw))) for i, kw in enumerate(requests)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert graphs.replays == batcher.batches and len(made) > 2
    assert all(r.calls == 0 for r in own)  # the engine's own runners never ran inside a graph
    for i, (kw, got) in enumerate(zip(requests, results)):
        want = eager.run(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE,
                         num_inference_steps=5, generator=torch.Generator().manual_seed(i),
                         output_type="latent", **kw).images
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def ours_plain(eng):
    return eng.run(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.5,
                   guidance_rescale=0.0, height=SIZE, width=SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images


def test_the_built_in_controlnet_puts_the_shape_where_the_mask_says(tmp_path, capsys):
    """The default model's own ControlNet (lumen.build("default", controlnet="default")): with a
    shape mask as the control image, the drawn shape's centroid lies on the mask; `lumen
    generate --control-image` on the built-in model uses it without --controlnet."""
    from PIL import Image

    from lumen.benchmarks import scene_analyzer
    from lumen.benchmarks.controlnet import control_for
    from lumen.cli import main
    from lumen.engine.builtin.train_controlnet import control_images

    prompt = "a red circle on a solid black background"
    eng = engine.build("default", controlnet="default")
    masks = control_for(prompt, 8, 123)
    images = eng.run(prompt, num_images_per_prompt=8, num_inference_steps=10, control_image=
                     control_images(masks), generator=[torch.Generator().manual_seed(i)
                                                       for i in range(8)], output_type="pt").images
    readings = scene_analyzer.read_scenes(images)
    hits = [scene_analyzer.inside(r, m[0]) for r, m in zip(readings, masks)]
    assert sum(hits) >= 7, [(r.x, r.y) for r in readings]
    mask = (masks[0, 0].numpy() * 255).round().astype("uint8")
    Image.fromarray(mask).convert("RGB").save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", prompt, "--control-image", str(tmp_path / "mask.png"), "--steps", "10",
                 "-o", str(out)]) == 0
    drawn = torch.from_numpy(__import__("numpy").array(Image.open(out).convert("RGB"))).permute(2, 0, 1)
    (reading,) = scene_analyzer.read_scenes(drawn[None].float() / 255)
    assert scene_analyzer.inside(reading, masks[0, 0]) and reading.kind == "circle"
    with pytest.raises(engine.InvalidInputError, match="'flawed': that built-in model ships no ControlNet"):
        engine.build("default", controlnet="flawed")
    capsys.readouterr()
    assert main(["generate", prompt, "--model", "flawed", "--control-image", str(tmp_path / "mask.png"),
                 "-o", str(out)]) == 2
    assert "controlnet='flawed': that built-in model ships no ControlNet" in capsys.readouterr().err


def test_the_controlnet_study_runs_small(tmp_path):
    import json

    from lumen.cli import main

    threads = torch.get_num_threads()
    assert main(["bench", "controlnet", "--n", "1", "--steps", "4", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the study ran on its own count, then gave ours back
    data = json.loads((tmp_path / "controlnet.json").read_text())
    assert data["analyzer_location"] == 1.0 and len(data["results"]) == 12
    for run in ("controlled", "plain"):
        assert 0 <= data["overall"][run]["location"] <= 1
    assert (tmp_path / "controlnet.png").stat().st_size > 0


def test_the_built_in_controlnet_training_runs_and_saves_a_loadable_controlnet(tmp_path):
    """The shipped command's code path, two steps on 8x8 scenes: the loss is finite, the zero
    convolutions move off zero, and the saved folder loads as controlnet=FOLDER."""
    from lumen.engine.builtin import train_controlnet

    config = train_controlnet.ControlConfig(steps=2, batch_size=2, tiny=True, warmup=1)
    threads = torch.get_num_threads()
    net, stats = train_controlnet.train(config, log=lambda m: None)
    assert torch.get_num_threads() == threads  # training ran on config.threads, then gave ours back
    assert stats["final_loss"] > 0 and stats["final_loss"] == stats["final_loss"]
    assert float(net.controlnet_mid_block.weight.detach().abs().max()) > 0
    train_controlnet.save(net, tmp_path, config, stats)
    eng = engine.build("default", controlnet=tmp_path)
    assert json_of(tmp_path / "training.json")["config"]["steps"] == 2
    assert len(eng.components.controlnets) == 1


def json_of(path):
    import json

    return json.loads(path.read_text())
