"""POST /v1/images/edits with the official openai client: inpainting where the mask is
transparent, image-to-image without a mask, each image equal to its request run alone; bad
uploads get a 4xx naming the field, and the next request is served."""
import io

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from lumen import engine

from server_helpers import RunningServer

KEY = "edit-key"
PROMPT = "a red circle on a solid black background"


@pytest.fixture(scope="module")
def eng():
    return engine.build("default")


@pytest.fixture(scope="module")
def server(eng):
    srv = RunningServer(eng, api_key=KEY, batch_wait_ms=5, max_pixels=64 * 64, max_body_bytes=64 * 1024)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def source() -> Image.Image:
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def transparent_square() -> Image.Image:
    """OpenAI's mask: opaque everywhere but a transparent square, the region to edit."""
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 4, 24, 20))
    return mask


def pixels(b64: str) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def alone(eng, image, strength, seed, mask=None, steps=6):
    out = eng.run(PROMPT, image=np.asarray(image, np.float32) / 255, strength=strength,
                  mask_image=None if mask is None else np.asarray(mask, np.float32) / 255,
                  num_inference_steps=steps, generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(out.convert("RGB")).astype(int)


def test_openai_client_edits_the_transparent_region_and_keeps_the_rest(api, eng):
    image = source()
    result = api.images.edit(image=("in.png", png(image), "image/png"),
                             mask=("mask.png", png(transparent_square()), "image/png"),
                             prompt=PROMPT, n=1, size="32x32", response_format="b64_json",
                             extra_body={"seed": 3, "num_inference_steps": 6})
    got = pixels(result.data[0].b64_json)
    edit = np.asarray(transparent_square())[..., 3] == 0
    assert (got[~edit] == np.asarray(image)[~edit]).all()  # kept: the input, exactly
    mask = Image.fromarray(np.where(edit, 255, 0).astype(np.uint8))
    assert np.abs(got - alone(eng, image, 1.0, 3, mask)).max() <= 1  # strength 1 with a mask
    assert np.abs(got[edit] - np.asarray(image)[edit]).mean() > 20  # the edited square changed


def test_without_a_mask_the_edit_is_image_to_image_and_an_alpha_image_is_its_own_mask(api, eng):
    image = source()
    result = api.images.edit(image=("in.png", png(image), "image/png"), prompt=PROMPT,
                             extra_body={"seed": 4, "num_inference_steps": 6, "strength": 0.5})
    assert np.abs(pixels(result.data[0].b64_json) - alone(eng, image, 0.5, 4)).max() <= 1
    with_alpha = image.convert("RGBA")
    with_alpha.putalpha(transparent_square().getchannel("A"))
    result = api.images.edit(image=("in.png", png(with_alpha), "image/png"), prompt=PROMPT,
                             extra_body={"seed": 5, "num_inference_steps": 6})
    got = pixels(result.data[0].b64_json)
    keep = np.asarray(transparent_square())[..., 3] > 0
    assert (got[keep] == np.asarray(image)[keep]).all()


BAD = [  # (files, form fields, status, the field the error names)
    ({}, {}, 422, "image"),
    ({"image": ("x.png", b"not an image", "image/png")}, {}, 422, "image"),
    ({"image": ("x.gif", None, "image/gif")}, {}, 422, "image"),
    ({"mask": ("m.png", png(Image.new("RGB", (32, 32))), "image/png")}, {}, 422, "mask"),
    ({"mask": ("m.png", png(Image.new("RGBA", (16, 16))), "image/png")}, {}, 422, "mask"),
    ({"image": ("x.png", png(Image.new("RGB", (128, 128))), "image/png")}, {}, 422, "image"),
    ({"image[]": ("y.png", None, "image/png")}, {}, 422, "image[]"),
    ({}, {"response_format": "url"}, 422, "response_format"),
    ({}, {"strength": "0"}, 422, "strength"),
    ({}, {"strength": "much"}, 422, "strength"),
    ({}, {"n": "99"}, 422, "n"),
    ({}, {"size": "huge"}, 422, "size"),
    ({}, {"prompt": None}, 422, "prompt"),
    ({}, {"model": "dall-e-2"}, 422, "model"),
    ({"control_image": ("c.png", png(Image.new("RGB", (32, 32))), "image/png")}, {}, 422,
     "control_image"),  # ControlNet is the generations route's and A1111's, never ignored here
    ({}, {"controlnet": "default"}, 422, "controlnet"),
    ({"image": ("big.png", b"\x89PNG" + b"0" * 70_000, "image/png")}, {}, 413, None),
]


@pytest.mark.parametrize("files,form,status,field", BAD)
def test_bad_edits_get_a_4xx_naming_the_field_and_the_server_goes_on(server, files, form, status, field):
    import httpx

    good_files = {"image": ("in.png", png(source()), "image/png")}
    good_form = {"prompt": PROMPT, "num_inference_steps": "2"}
    if not files and not form:
        good_files = {}  # the missing file part
    parts = {**good_files, **files}
    if "image[]" in parts:
        parts = [("image[]", parts.pop("image")), ("image[]", parts["image[]"][:1] + (png(source()),) +
                                                    parts["image[]"][2:])]
    elif "image" in parts and parts["image"][1] is None:  # a GIF
        gif = io.BytesIO()
        Image.new("RGB", (8, 8)).save(gif, format="GIF")
        parts["image"] = ("x.gif", gif.getvalue(), "image/gif")
    data = {k: v for k, v in {**good_form, **form}.items() if v is not None}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        r = c.post("/v1/images/edits", files=parts, data=data)
        assert r.status_code == status, r.text
        if field is not None:
            error = r.json()["error"]
            assert error["param"] == field, error
        ok = c.post("/v1/images/edits", files={"image": ("in.png", png(source()), "image/png")},
                    data=good_form)
        assert ok.status_code == 200, ok.text
