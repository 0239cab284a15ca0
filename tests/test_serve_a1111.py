"""AUTOMATIC1111's API as real clients call it: webuiapi, and Open WebUI's and SillyTavern's
request sequences as their source sends them, against a real server on 127.0.0.1."""
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lumen import engine
from lumen.serve.a1111 import lora_items, parse_infotext

from server_helpers import RunningServer

KEY = "a1111-key"
PROMPT = "a red circle on a solid black background"
DEADLINE_S = 120  # every wait below is bounded


def basic(user: str, password: str) -> dict:
    """The Authorization header A1111 clients send for --api-auth credentials."""
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def eng():
    return engine.build("default")


@pytest.fixture(scope="module")
def server(eng):
    srv = RunningServer(eng, api_key=KEY, batch_wait_ms=5, max_images=4, max_pixels=64 * 64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=basic("user", KEY)) as c:
        yield c


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", username="any", password=KEY,
                             steps=3)


@pytest.fixture(scope="module")
def title(client):
    (model,) = client.get("/sdapi/v1/sd-models").json()
    return model["title"]


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---------------------------------------------------------------------------------------------
# webuiapi, the Python client


def test_webuiapi_txt2img_and_png_info_round_trip(api):
    result = api.txt2img(prompt=PROMPT, negative_prompt="white", width=32, height=32, seed=5,
                         cfg_scale=7.5, sampler_name="DPM++ 2M")
    assert result.image.size == (32, 32) and result.info["seed"] == 5
    # webuiapi sends every A1111 field; those that change nothing here are named
    assert {"styles", "hr_scale", "denoising_strength", "subseed_strength", "send_images",
            "save_images", "do_not_save_grid", "override_settings_restore_afterwards"} <= \
        set(result.info["ignored"])
    assert "sampler_index" not in result.info["ignored"] and result.info["interrupted"] is False
    params = api.png_info(result.image).parameters
    assert (params["Seed"], params["Steps"], params["Sampler"], params["CFG scale"]) == \
        ("5", "3", "DPM++ 2M", "7.5")
    assert (params["Prompt"], params["Negative prompt"], params["Size-1"]) == (PROMPT, "white", "32")


def test_webuiapi_model_and_options_calls(api, title):
    assert api.util_get_model_names() == [title]
    assert api.util_get_current_model() == title
    options = api.get_options()
    assert options["sd_model_checkpoint"] == title and options["CLIP_stop_at_last_layers"] == 1
    assert options["sd_checkpoint_hash"].startswith(title[-11:-1])  # the short hash in the title
    assert api.set_options({"sd_model_checkpoint": title}) == {"ignored": []}
    assert api.util_set_model("default") is None  # closest title: the served one
    assert api.set_options({"samples_format": "jpg", "eta_ddim": 0.0}) == {"ignored": ["samples_format"]}


def test_webuiapi_lists(api):
    assert [u["name"] for u in api.get_upscalers()] == ["None"]
    assert api.get_latent_upscale_modes() == [] and api.get_sd_vae() == []  # pixel-space model
    assert api.get_loras() == [] and api.get_hypernetworks() == []
    assert api.get_face_restorers() == [] and api.get_prompt_styles() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert [s["name"] for s in api.get_samplers()] == ["DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M"]
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["model"] == "default" and flags["max_images"] == 4
    assert KEY not in json.dumps(flags)  # the key is never shown
    memory = api.get_memory()
    assert 0 < memory["ram"]["free"] <= memory["ram"]["total"]
    assert memory["cuda"] == {"error": "unavailable"}  # no CUDA here
    assert api.refresh_checkpoints() is None


def test_webuiapi_progress_interrupt_skip_and_wait_for_ready(api):
    progress = api.get_progress()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert api.interrupt() == {} and api.skip() is None  # nothing running: no-ops
    # it loops until progress is 0 and no job is in line, then returns (None, in webuiapi 0.9.17)
    waiter = threading.Thread(target=api.util_wait_for_ready, kwargs={"check_interval": 0.05})
    waiter.start()
    waiter.join(DEADLINE_S)
    assert not waiter.is_alive()


def alone_img2img(eng, image, strength, seed, mask=None, steps=10, sampler="ddim", eta=0.0):
    """The same request run alone through Engine.run, as the server would: 8-bit RGB array."""
    config = eng.config.replace(sampler=sampler)
    out = eng.with_config(config).run(
        PROMPT, negative_prompt="", image=np.asarray(image, np.float32) / 255, strength=strength,
        mask_image=None if mask is None else np.asarray(mask, np.float32) / 255,
        num_inference_steps=steps, guidance_scale=7.5, guidance_rescale=0.7, eta=eta,
        generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(out.convert("RGB")).astype(int)


def test_webuiapi_img2img_runs_the_last_steps_from_the_image(api, eng):
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    result = api.img2img(images=[white], prompt=PROMPT, width=32, height=32, denoising_strength=0.5,
                         seed=5, steps=10, cfg_scale=7.5, sampler_name="DDIM", eta=0.0)
    got = np.asarray(result.image.convert("RGB")).astype(int)
    assert np.abs(got - alone_img2img(eng, white, 0.5, 5)).max() <= 1
    assert got[:6, :6].mean() > 100  # the white input shows through the prompt's black
    assert result.info["all_seeds"] == [5] and "Denoising strength: 0.5" in result.info["infotexts"][0]


def test_img2img_takes_a_jpeg_with_a_data_url_prefix(client):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="JPEG")
    data = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "width": 32, "height": 32,
                                                "steps": 4, "init_images": [data]})
    assert r.status_code == 200, r.text
    assert png(r.json()["images"][0]).size == (32, 32)


def test_webuiapi_inpaint_keeps_the_unmasked_pixels(api, eng):
    g = np.random.default_rng(3)
    source = Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))  # repaint the middle
    result = api.img2img(images=[source], mask_image=mask, prompt=PROMPT, width=32, height=32,
                         denoising_strength=1.0, inpainting_fill=1, inpaint_full_res=False,
                         mask_blur=0, seed=6, steps=8, cfg_scale=7.5, sampler_name="DDIM", eta=0.0,
                         include_init_images=True)
    got = np.asarray(result.images[0].convert("RGB")).astype(int)
    kept = np.asarray(mask) == 0
    assert (got[kept] == np.asarray(source)[kept]).all()  # the overlay: exactly the input
    assert np.abs(got - alone_img2img(eng, source, 1.0, 6, mask, steps=8)).max() <= 1
    assert len(result.images) == 2 and result.images[1].size == (32, 32)  # the init image appended


def test_inpainting_fill_latent_noise_starts_the_region_from_noise(api, eng):
    """inpainting_fill 2 ("latent noise") is Engine.run's masked_content="noise"."""
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    kwargs = dict(images=[grey], mask_image=mask, prompt=PROMPT, width=32, height=32,
                  denoising_strength=0.5, inpaint_full_res=False, mask_blur=0, seed=8, steps=10,
                  cfg_scale=7.5, sampler_name="DDIM", eta=0.0)
    fills = {fill: np.asarray(api.img2img(inpainting_fill=fill, **kwargs).image.convert("RGB")).astype(int)
             for fill in (1, 2)}
    out = eng.with_config(eng.config.replace(sampler="ddim")).run(
        PROMPT, negative_prompt="", image=np.asarray(grey, np.float32) / 255, strength=0.5,
        mask_image=np.asarray(mask, np.float32) / 255, masked_content="noise", num_inference_steps=10,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(8)).images[0]
    assert np.abs(fills[2] - np.asarray(out.convert("RGB")).astype(int)).max() <= 1
    assert np.abs(fills[2] - fills[1])[:, 16:].mean() > 5 and (fills[2][:, :16] == 128).all()


@pytest.mark.parametrize("change,field", [
    (dict(init_images=["not base64!"]), "init_images[0]"),
    (dict(init_images=[base64.b64encode(b"GIF89a....").decode()]), "init_images[0]"),
    (dict(init_images=[]), "init_images"),
    (dict(mask="AAAA"), "mask"),
    (dict(mask="MASK", inpainting_fill=0), "inpainting_fill"),
    (dict(mask="MASK", inpainting_fill=3), "inpainting_fill"),
    (dict(mask="MASK", inpaint_full_res=True), "inpaint_full_res"),
    (dict(resize_mode=1), "resize_mode"),
    (dict(denoising_strength=0), "denoising_strength"),
    (dict(denoising_strength=0.05, steps=10), "denoising_strength"),
    (dict(init_images=["BIG"]), "init_images[0]"),
    (dict(mask_blur=-1), "mask_blur"),
])
def test_bad_img2img_requests_get_422_naming_the_field_and_the_server_goes_on(client, change, field):
    def b64(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()
    good = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 4, "seed": 1,
            "init_images": [b64(Image.new("RGB", (32, 32)))]}
    body = {**good, **change}
    if body.get("mask") == "MASK":
        body["mask"] = b64(Image.new("L", (32, 32), 255))
    if body["init_images"] == ["BIG"]:
        body["init_images"] = [b64(Image.new("RGB", (128, 128)))]  # past max_pixels 64x64
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == field or field in (error["param"] or "") or field in error["message"], error
    assert client.post("/sdapi/v1/img2img", json=good).status_code == 200


# ---------------------------------------------------------------------------------------------
# Open WebUI and SillyTavern, as their source sends the requests


def test_open_webui_sequence(server, title):
    # backend/open_webui/routers/images.py: the lower-case authorization header with Basic
    # credentials; verify (GET options), models, then a generation: options, options posted
    # back whole when the model differs, txt2img with its default payload.
    headers = basic("webui", KEY)
    with httpx.Client(base_url=server.url, headers=headers, timeout=DEADLINE_S) as c:
        c.get("/sdapi/v1/options").raise_for_status()
        models = [{"id": m["title"], "name": m["model_name"]} for m in c.get("/sdapi/v1/sd-models").json()]
        assert models == [{"id": title, "name": "default"}]
        options = c.get("/sdapi/v1/options").json()
        assert options["sd_model_checkpoint"] == models[0]["id"]  # no switch needed
        r = c.post("/sdapi/v1/options", json={**options, "sd_model_checkpoint": models[0]["id"]})
        r.raise_for_status()
        assert r.json() == {"ignored": []}
        res = c.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "batch_size": 2, "width": 32,
                                                "height": 32, "steps": 3}).json()
        assert len(res["images"]) == 2 and json.loads(res["info"])["all_seeds"][1] == \
            json.loads(res["info"])["seed"] + 1
        assert all(png(b).size == (32, 32) and png(b).format == "PNG" for b in res["images"])


def test_sillytavern_sequence(server, title):
    # src/endpoints/stable-diffusion.js: every call carries Basic auth; connect pings options,
    # then lists; set-model posts options and polls progress; generate reads options, then
    # posts the extension's txt2img body (url and auth included).
    with httpx.Client(base_url=server.url, headers=basic("st", KEY), timeout=DEADLINE_S) as c:
        assert c.get("/sdapi/v1/options").status_code == 200  # ping
        upscalers = [x["name"] for x in c.get("/sdapi/v1/upscalers").json()]
        latent = [x["name"] for x in c.get("/sdapi/v1/latent-upscale-modes").json()]
        assert upscalers[:1] + latent + upscalers[1:] == ["None"]
        vaes = c.get("/sdapi/v1/sd-vae")
        assert vaes.status_code == 200 and vaes.json() == []
        assert c.get("/sdapi/v1/sd-modules").status_code == 404  # Forge's; ST takes sd-vae's
        samplers = [x["name"] for x in c.get("/sdapi/v1/samplers").json()]
        schedulers = [x["name"] for x in c.get("/sdapi/v1/schedulers").json()]
        models = [x["title"] for x in c.get("/sdapi/v1/sd-models").json()]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0] == title
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
        for _ in range(10):  # ST polls 10 times, 2 s apart
            progress = c.get("/sdapi/v1/progress").json()
            if progress["progress"] == 0.0 and progress["state"]["job_count"] == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("progress never showed an idle server")
        assert "forge_preset" not in c.get("/sdapi/v1/options").json()
        body = {"url": server.url, "auth": f"st:{KEY}", "prompt": PROMPT, "negative_prompt": "white",
                "sampler_name": samplers[2], "scheduler": schedulers[0], "steps": 3, "cfg_scale": 7,
                "width": 32, "height": 32, "restore_faces": False, "enable_hr": False,
                "hr_upscaler": "None", "hr_scale": 1, "denoising_strength": 0.7,
                "hr_second_pass_steps": 0, "seed": 9,
                "override_settings": {"CLIP_stop_at_last_layers": 1},
                "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True,
                "send_images": True, "do_not_save_grid": False, "do_not_save_samples": False}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        assert png(r.json()["images"][0]).size == (32, 32)
        info = json.loads(r.json()["info"])
        assert info["seed"] == 9 and info["sampler_name"] == "Euler a"
        assert {"url", "auth", "clip_skip", "hr_upscaler"} <= set(info["ignored"])


# ---------------------------------------------------------------------------------------------
# override_settings, refusals, auth


def test_override_settings_name_the_served_model_or_get_422(client, title):
    good = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2}
    r = client.post("/sdapi/v1/txt2img", json={**good, "override_settings": {
        "sd_model_checkpoint": title, "sd_vae": "Automatic"}})
    assert r.status_code == 200 and json.loads(r.json()["info"])["ignored"] == [
        "override_settings.sd_vae"]
    r = client.post("/sdapi/v1/txt2img", json={**good, "override_settings": {
        "sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]"}})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "override_settings.sd_model_checkpoint"
    assert "sd_xl_base_1.0" in r.json()["error"]["message"] and title in r.json()["error"]["message"]
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert r.status_code == 422 and "'other'" in r.json()["error"]["message"]
    r = client.post("/sdapi/v1/txt2img", json={**good, "override_settings": {
        "CLIP_stop_at_last_layers": 0}})
    assert r.status_code == 422 and "CLIP_stop_at_last_layers=0" in r.json()["error"]["message"]
    r = client.post("/sdapi/v1/txt2img", json={**good, "override_settings": {
        "CLIP_stop_at_last_layers": 2}})  # the built-in model has no CLIP to skip layers of
    assert r.status_code == 422 and "CLIP text encoder" in r.json()["error"]["message"]


def test_unserved_and_unknown_endpoints_are_4xx_that_name_them(client):
    r = client.post("/sdapi/v1/extra-single-image", json={"image": ""})
    assert r.status_code == 404 and "upscaling" in r.json()["error"]["message"]
    r = client.get("/sdapi/v1/no-such-thing")
    assert r.status_code == 404
    assert r.json()["error"]["message"] == "GET /sdapi/v1/no-such-thing is not an endpoint of this server"


def test_png_info_refuses_what_is_not_a_png_and_reads_a_bare_png(client):
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"GIF89a....").decode()})
    assert r.status_code == 422 and r.json()["error"]["param"] == "image"
    r = client.post("/sdapi/v1/png-info", json={"image": "not base64!"})
    assert r.status_code == 422 and "base64" in r.json()["error"]["message"]
    buffer = io.BytesIO()
    info = PngInfo()
    info.add_text("Software", "elsewhere")
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()})
    assert r.json() == {"info": "", "items": {"Software": "elsewhere"}, "parameters": {}}


def test_basic_auth_needs_the_key_as_password(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/sdapi/v1/options", headers=basic("user", "wrong")).status_code == 401
        assert c.get("/sdapi/v1/options", headers=basic("", "")).status_code == 401
        assert c.get("/sdapi/v1/options", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# progress and interrupt on a running server


def in_thread(server, results: dict, name: str, path: str, body: dict) -> threading.Thread:
    """POST body from a thread with its own client; the response lands in results[name]."""
    def post():
        with server.client(headers=basic("user", KEY)) as c:
            results[name] = c.post(path, json=body)
    thread = threading.Thread(target=post)
    thread.start()
    return thread


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {DEADLINE_S} s"
        time.sleep(0.01)


def test_progress_reports_the_running_batch(server, client):
    results = {}
    thread = in_thread(server, results, "run", "/sdapi/v1/txt2img",
                       {"prompt": PROMPT, "width": 32, "height": 32, "steps": 60, "seed": 1})
    states = []
    wait_until(lambda: states.append(client.get("/sdapi/v1/progress").json()) or
               states[-1]["state"]["sampling_step"] > 0 or "run" in results, "a step")
    thread.join(DEADLINE_S)
    assert results["run"].status_code == 200
    running = [s for s in states if s["state"]["sampling_step"] > 0]
    assert running, "the batch finished before progress saw a step"
    state = running[0]
    assert state["state"]["sampling_steps"] == 60 and state["state"]["job_count"] == 1
    assert state["progress"] == state["state"]["sampling_step"] / 60 and state["eta_relative"] >= 0
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_interrupt_cancels_what_waits_and_the_server_goes_on(server, client):
    gate = threading.Event()
    busy = server.batcher.call(lambda: gate.wait(DEADLINE_S))  # the worker is busy until set
    results = {}
    threads = [in_thread(server, results, "a1111", "/sdapi/v1/txt2img",
                         {"prompt": PROMPT, "width": 32, "height": 32, "steps": 2}),
               in_thread(server, results, "openai", "/v1/images/generations",
                         {"prompt": PROMPT, "size": "32x32", "num_inference_steps": 3})]
    try:
        wait_until(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2,
                   "two requests in line")
        assert client.post("/sdapi/v1/interrupt").json() == {}
    finally:
        gate.set()
        busy.result(DEADLINE_S)
        for thread in threads:
            thread.join(DEADLINE_S)
    interrupted = results["a1111"].json()
    assert results["a1111"].status_code == 200 and interrupted["images"] == []
    assert json.loads(interrupted["info"])["interrupted"] is True
    assert results["openai"].status_code == 409
    assert "interrupt" in results["openai"].json()["error"]["message"]
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "width": 32, "height": 32,
                                                "steps": 2})
    assert r.status_code == 200 and len(r.json()["images"]) == 1  # still serving
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is False


def png_size(b64: str) -> tuple[int, int]:
    return png(b64).size


def test_interrupt_answers_running_jobs_with_their_x0_estimates_at_a_step_boundary(server, client):
    results, ticks = {}, server.batcher.ticks
    long = {"prompt": PROMPT, "width": 32, "height": 32, "steps": 400}
    threads = [in_thread(server, results, "one", "/sdapi/v1/txt2img", {**long, "seed": 1}),
               in_thread(server, results, "two", "/sdapi/v1/txt2img", {**long, "batch_size": 2})]
    wait_until(lambda: server.batcher.running_images == 3 and
               client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2, "3 images running")
    assert client.post("/sdapi/v1/interrupt").json() == {}
    for thread in threads:
        thread.join(DEADLINE_S)
    for name, n in (("one", 1), ("two", 2)):
        body = results[name].json()
        assert results[name].status_code == 200 and json.loads(body["info"])["interrupted"] is True
        assert [png_size(b) for b in body["images"]] == [(32, 32)] * n
    assert 2 <= server.batcher.ticks - ticks < 400 and server.batcher.running_images == 0
    assert client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_skip_ends_the_running_jobs_and_the_waiting_ones_still_run(eng):
    srv = RunningServer(eng, max_batch=1, batch_wait_ms=0, api_key=KEY, preview_every=1)
    results = {}
    try:
        with srv.client(headers=basic("user", KEY)) as c:
            first = in_thread(srv, results, "running", "/sdapi/v1/txt2img",
                              {"prompt": PROMPT, "width": 32, "height": 32, "steps": 400})
            wait_until(lambda: c.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2,
                       "the first request running")
            second = in_thread(srv, results, "waiting", "/sdapi/v1/txt2img",
                               {"prompt": PROMPT, "width": 32, "height": 32, "steps": 3})
            wait_until(lambda: srv.batcher.waiting_images == 1, "the second request waiting")
            preview = c.get("/sdapi/v1/progress").json()["current_image"]
            assert png_size(preview) == (32, 32)  # --preview-every 1: the x0 estimate as PNG
            assert c.post("/sdapi/v1/skip").status_code == 200
            first.join(DEADLINE_S)
            second.join(DEADLINE_S)
    finally:
        srv.stop()
    skipped, done = (results[k].json() for k in ("running", "waiting"))
    assert json.loads(skipped["info"])["skipped"] is True and len(skipped["images"]) == 1
    assert json.loads(done["info"])["skipped"] is False and len(done["images"]) == 1
    assert srv.batcher.ticks < 400


# ---------------------------------------------------------------------------------------------
# clip skip on a CLIP model, LoRA listing, the infotext parser


def test_clip_stop_at_last_layers_is_clip_skip(tiny_pipeline_dir):
    eng = engine.build(str(tiny_pipeline_dir), device="cpu")
    srv = RunningServer(eng, model_name="tiny", batch_wait_ms=5, max_pixels=64 * 64)
    try:
        with srv.client() as c:
            def image(overrides):
                body = {"prompt": "a cat", "width": 16, "height": 16, "steps": 2, "seed": 3,
                        "sampler_name": "DDIM", "override_settings": overrides}
                r = c.post("/sdapi/v1/txt2img", json=body)
                assert r.status_code == 200, r.text
                return np.asarray(png(r.json()["images"][0]).convert("RGB")), r.json()["images"][0]
            skipped, b64 = image({"CLIP_stop_at_last_layers": 2})
            plain, _ = image({"CLIP_stop_at_last_layers": 1})
    finally:
        srv.stop()
    import torch
    alone = eng.with_config(eng.config.replace(sampler="ddim")).run(
        prompt="a cat", height=16, width=16, num_inference_steps=2, guidance_scale=7.0,
        clip_skip=1, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(skipped.astype(int) - np.asarray(alone.convert("RGB")).astype(int)).max() <= 1
    assert np.abs(skipped.astype(int) - plain.astype(int)).max() > 1
    assert "Clip skip: 2" in png(b64).text["parameters"]


def test_loras_are_listed_by_file_name_with_their_scale(tmp_path):
    path = tmp_path / "style.safetensors"
    path.write_bytes(b"x")
    provenance = ({"sha256": "ab" * 32, "scale": 0.8},)
    assert lora_items([(str(path), 0.8)], provenance) == [
        {"name": "style", "alias": "style", "path": "style",
         "metadata": {"scale": 0.8, "sha256": "ab" * 32, "fused": True}}]
    assert lora_items(None, provenance)[0]["name"] == "lora_ababababab"  # passed in as weights


def test_infotext_parses_as_a1111_does():
    text = ('a "quoted" cat\nsecond line\nNegative prompt: dog\nmore neg\n'
            'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, '
            'Lora hashes: "a: 1, b: 2", Model: m')
    assert parse_infotext(text) == {
        "Prompt": 'a "quoted" cat\nsecond line', "Negative prompt": "dog\nmore neg",
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size-1": "512",
        "Size-2": "768", "Lora hashes": "a: 1, b: 2", "Model": "m", "Clip skip": "1"}
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": "",
                                               "Clip skip": "1"}
