"""`lumen serve` over real HTTP: the official openai client, A1111 payloads, limits, metrics."""
import base64
import io
import json
import threading

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from lumen import engine

from server_helpers import RunningServer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["a red circle on a solid black background", "a white square on a solid white background",
           "a blue triangle on a solid gray background", "a yellow circle on a solid black background"]
SMALL = dict(num_inference_steps=3)  # OpenAI extra body of the cheap requests


@pytest.fixture(scope="module")
def eng():
    return engine.build("default")


@pytest.fixture(scope="module")
def server(eng):
    srv = RunningServer(eng, api_key=KEY, batch_wait_ms=5, max_images=8, max_pixels=64 * 64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.client(headers=AUTH) as c:
        yield c


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def openai_images(client, prompt, n=1, seed=0, **extra):
    body = {"prompt": prompt, "n": n, "size": "32x32", "seed": seed, **SMALL, **extra}
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    return [pixels(d["b64_json"]) for d in r.json()["data"]]


def test_official_openai_client_generates_images(server):
    api = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    result = api.images.generate(model="default", prompt=PROMPTS[0], n=2, size="32x32",
                                 response_format="b64_json",
                                 extra_body={"num_inference_steps": 3, "seed": 11, "sampler": "euler_ancestral",
                                             "eta": 0.5, "negative_prompt": "white"})
    assert len(result.data) == 2 and result.created > 0
    first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert first.size == (32, 32)
    text = first.text["parameters"]
    assert text.startswith(PROMPTS[0] + "\nNegative prompt: white\nSteps: 3, Sampler: Euler a")
    assert "Seed: 11," in text and "Eta: 0.5" in text
    assert [d.model_extra["seed"] for d in result.data] == [11, 12]
    with pytest.raises(Exception, match="422|size"):
        api.images.generate(model="default", prompt=PROMPTS[0], size="1024x1024")


# The payload AUTOMATIC1111's web UI clients send (webuiapi's defaults), at a size the
# built-in 32x32 model serves cheaply.
A1111_DEFAULT = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
    "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
    "prompt": PROMPTS[1], "styles": [], "seed": 42, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": 0, "seed_resize_from_w": 0, "sampler_name": "Euler a", "batch_size": 2,
    "n_iter": 1, "steps": 3, "cfg_scale": 7.0, "width": 32, "height": 32, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "",
    "eta": 1.0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
    "sampler_index": "Euler", "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "scheduler": "Automatic",
}


def test_a1111_default_payload_reports_seeds_and_info_as_a_json_string(client):
    r = client.post("/sdapi/v1/txt2img", json=A1111_DEFAULT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert info["seed"] == 42 and info["all_seeds"] == [42, 43]
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("Euler a", 3, 7.0)
    assert len(body["images"]) == 2 and body["parameters"]["prompt"] == PROMPTS[1]
    png = Image.open(io.BytesIO(base64.b64decode(body["images"][1])))
    assert "Seed: 43," in png.text["parameters"] and "Size: 32x32" in png.text["parameters"]
    random_seed = json.loads(client.post("/sdapi/v1/txt2img", json={**A1111_DEFAULT, "seed": -1}).json()["info"])
    assert random_seed["seed"] >= 0 and random_seed["all_seeds"][1] == random_seed["seed"] + 1


def test_a1111_listings(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert names == ["DDIM", "Euler", "Euler a", "Heun", "DPM++ 2M"]
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["default"]


GOOD_OPENAI = {"prompt": PROMPTS[0], "size": "32x32", "num_inference_steps": 2}
GOOD_A1111 = {"prompt": PROMPTS[0], "width": 32, "height": 32, "steps": 2}
BAD = [  # (endpoint, body or raw bytes, the field the error must name)
    ("openai", b"{not json", None),
    ("openai", b"[1, 2]", None),
    ("openai", {"size": "32x32"}, "prompt"),
    ("openai", {**GOOD_OPENAI, "prompt": 123}, "prompt"),
    ("openai", {**GOOD_OPENAI, "n": 0}, "n"),
    ("openai", {**GOOD_OPENAI, "n": 9}, "n"),
    ("openai", {**GOOD_OPENAI, "size": "big"}, "size"),
    ("openai", {**GOOD_OPENAI, "size": "4096x4096"}, "size"),
    ("openai", {**GOOD_OPENAI, "response_format": "url"}, "response_format"),
    ("openai", {**GOOD_OPENAI, "num_inference_step": 2}, "num_inference_step"),
    ("openai", {**GOOD_OPENAI, "num_inference_steps": 0}, "num_inference_steps"),
    ("openai", {**GOOD_OPENAI, "num_inference_steps": 5000}, "num_inference_steps"),
    ("openai", {**GOOD_OPENAI, "num_inference_steps": 2.5}, "num_inference_steps"),
    ("openai", {**GOOD_OPENAI, "guidance_scale": 0.5}, "guidance_scale"),
    ("openai", {**GOOD_OPENAI, "guidance_scale": "high"}, "guidance_scale"),
    ("openai", b'{"prompt": "a red circle", "guidance_scale": NaN}', "guidance_scale"),
    ("openai", b'{"prompt": "a red circle", "guidance_scale": 1e999}', "guidance_scale"),
    ("openai", {**GOOD_OPENAI, "guidance_rescale": 2}, "guidance_rescale"),
    ("openai", {**GOOD_OPENAI, "eta": -1}, "eta"),
    ("openai", {**GOOD_OPENAI, "eta": 0.5, "sampler": "euler"}, "eta"),
    ("openai", {**GOOD_OPENAI, "sampler": "plms"}, "sampler"),
    ("openai", {**GOOD_OPENAI, "seed": -5}, "seed"),
    ("openai", {**GOOD_OPENAI, "prompt": "a cat"}, "prompt"),
    ("openai", {**GOOD_OPENAI, "negative_prompt": "dogs"}, "negative_prompt"),
    ("openai", {**GOOD_OPENAI, "model": "/etc/passwd"}, "model"),
    ("a1111", {**GOOD_A1111, "enable_hr": True}, "enable_hr"),
    ("a1111", {**GOOD_A1111, "restore_faces": True}, "restore_faces"),
    ("a1111", {**GOOD_A1111, "alwayson_scripts": {"adetailer": {"args": []}}}, "alwayson_scripts"),
    ("a1111", {**GOOD_A1111, "alwayson_scripts": {"controlnet": {"args": [{"model": "canny"}]}}},
     "alwayson_scripts.controlnet.args[0].model"),  # this server loaded no ControlNet
    ("a1111", {**GOOD_A1111, "script_name": "x/y/z plot"}, "script_name"),
    ("a1111", {**GOOD_A1111, "sampler_name": "PLMS"}, "sampler_name"),
    ("a1111", {**GOOD_A1111, "scheduler": "Exponential"}, "scheduler"),
    ("a1111", {**GOOD_A1111, "batch_size": 0}, "batch_size"),
    ("a1111", {**GOOD_A1111, "batch_size": 4, "n_iter": 4}, "batch_size x n_iter"),
    ("a1111", {**GOOD_A1111, "width": 100000}, "width x height"),
    ("a1111", {**GOOD_A1111, "cfg_scale": 0.5}, "cfg_scale"),
    ("a1111", {**GOOD_A1111, "steps": 0}, "steps"),
    ("a1111", {**GOOD_A1111, "steps": "many"}, "steps"),
    ("a1111", {**GOOD_A1111, "sampler_name": "Euler", "s_churn": 1, "s_noise": 0}, "s_noise"),
    ("a1111", {**GOOD_A1111, "prompt": "a cat"}, "prompt"),
]
PATHS = {"openai": "/v1/images/generations", "a1111": "/sdapi/v1/txt2img"}


def post(client, endpoint, body):
    if isinstance(body, bytes):
        return client.post(PATHS[endpoint], content=body, headers={"content-type": "application/json"})
    return client.post(PATHS[endpoint], json=body)


def test_bad_requests_get_422_naming_the_field_and_the_next_request_is_served(client):
    assert len(BAD) >= 20
    for endpoint, body, field in BAD:
        r = post(client, endpoint, body)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert error["message"], body
        if field is not None:
            assert error["param"] == field and field.split()[0] in error["message"], (body, error)
        good = post(client, endpoint, GOOD_OPENAI if endpoint == "openai" else GOOD_A1111)
        assert good.status_code == 200, (body, good.text)


def test_every_endpoint_but_health_needs_the_api_key(server):
    with server.client() as anonymous:
        assert anonymous.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            for path in ("/metrics", "/sdapi/v1/samplers"):
                r = anonymous.get(path, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert anonymous.post(PATHS["openai"], json=GOOD_OPENAI, headers=headers).status_code == 401


def test_bodies_over_the_limit_get_413_by_length_or_as_they_stream(client):
    assert client.post(PATHS["openai"], content=b" " * (2 << 20),
                       headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(40):
            yield b" " * 65536
    assert client.post(PATHS["openai"], content=chunks(),
                       headers={"content-type": "application/json"}).status_code == 413
    assert post(client, "openai", GOOD_OPENAI).status_code == 200


def test_metrics_count_requests_images_errors_and_batches(client):
    post(client, "openai", {**GOOD_OPENAI, "n": 2})
    text = client.get("/metrics").text
    for name in ('lumen_requests_total{endpoint="/v1/images/generations",status="200"}',
                 'lumen_images_total{endpoint="/v1/images/generations",status="200"}',
                 "lumen_queue_images", "lumen_batch_images_bucket", "lumen_batch_seconds_count",
                 'lumen_request_seconds_count{endpoint="/v1/images/generations"}'):
        assert name in text, name
    assert client.get("/health").json() == {"status": "ok"}


MIXED_HTTP = [  # steps, sampler, guidance (1: CFG off): requests that share UNet calls all the same
    dict(num_inference_steps=3), dict(num_inference_steps=5, sampler="euler_ancestral", eta=0.5),
    dict(num_inference_steps=2, guidance_scale=1.0), dict(num_inference_steps=4, sampler="heun"),
    dict(num_inference_steps=3, sampler="dpmpp_2m", guidance_scale=5.0),
    dict(num_inference_steps=4, guidance_scale=9.0, guidance_rescale=0.0)]


def test_http_requests_batch_and_each_image_equals_the_request_served_alone(eng, client):
    requests = [(PROMPTS[i % 4], 1 + i % 3, 100 + 10 * i) for i in range(6)]  # 12 images
    alone = [openai_images(client, p, n, s, **MIXED_HTTP[i]) for i, (p, n, s) in enumerate(requests)]
    batching = RunningServer(eng, batch_wait_ms=1500, max_batch=8)
    try:
        results = [None] * len(requests)
        with batching.client() as c:
            def send(i):
                results[i] = openai_images(c, *requests[i], **MIXED_HTTP[i])
            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
            [t.start() for t in threads]
            [t.join(120) for t in threads]
        assert batching.batcher.mean_batch_size > 1
    finally:
        batching.stop()
    # 8-bit PNGs of the same images: equal but for fp32 rounding across batch sizes (see
    # test_serve_batching), which can move a pixel by one level.
    for got, want in zip(results, alone, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            diff = np.abs(a.astype(int) - b.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01
