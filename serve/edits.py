"""The OpenAI Images edit API: POST /v1/images/edits, a multipart form, on the step scheduler.

Form fields as OpenAI defines them: `image` (or `image[]`: one image, PNG or JPEG), an optional
`mask` (a PNG whose fully transparent pixels mark where to edit; without one, an image with
transparency is its own mask), `prompt`, `n`, `size` (default: the image's; the image is
resized to it), `response_format` (b64_json), `model`. Lumen's fields come as form fields too:
`negative_prompt`, `num_inference_steps`, `guidance_scale`, `guidance_rescale`, `eta`, `seed`,
`sampler`, `cache_interval`, `cache_branch_id` and `strength` (default 1 with a mask: the transparent region is drawn anew; 0.75
without: image-to-image). Other OpenAI fields are accepted and change nothing.
"""
import numpy as np
import pydantic
from PIL import Image
from starlette.datastructures import UploadFile

from .img2img import read_image, to_tensor
from .schemas import InvalidRequest, OpenAIImageRequest

ALPHA_MODES = ("RGBA", "LA")  # decoded PNGs with alpha (a palette PNG carries "transparency")
LUMEN_FIELDS = ("prompt", "model", "n", "size", "response_format", "negative_prompt",
                "num_inference_steps", "guidance_scale", "guidance_rescale", "eta", "seed", "sampler",
                "cache_interval", "cache_branch_id")


async def edit_form(form, max_pixels: int) -> tuple[OpenAIImageRequest, Image.Image, Image.Image | None, float]:
    """(the request's generation fields, the image, the mask as L (white edits) or None, strength)."""
    files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if not files:
        raise InvalidRequest("image", "no image file part; expected the image to edit as `image` "
                                      "(or `image[]`), PNG or JPEG")
    if len(files) > 1:
        raise InvalidRequest("image[]", f"{len(files)} images; expected one")
    image = await read_file(files[0], "image", max_pixels)
    mask_part = form.get("mask")
    mask = None
    if mask_part is not None:
        mask = alpha_mask(await read_file(mask_part, "mask", max_pixels), "mask", required=True)
        if mask.size != image.size:
            raise InvalidRequest("mask", f"mask is {mask.size[0]}x{mask.size[1]}; expected the "
                                         f"image's {image.size[0]}x{image.size[1]}")
    elif image.mode in ALPHA_MODES or "transparency" in image.info:
        mask = alpha_mask(image, "image", required=False)
    for field in ("control_image", "controlnet"):
        if field in form:
            raise InvalidRequest(field, f"{field} in an edits form; ControlNet takes "
                                        "/v1/images/generations' control_image, or A1111's img2img "
                                        "with alwayson_scripts.controlnet")
    fields = {k: v for k, v in form.multi_items() if k in LUMEN_FIELDS and isinstance(v, str)}
    fields.setdefault("size", f"{image.width}x{image.height}")
    try:
        req = OpenAIImageRequest(**fields)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(param, f"{param}: {first['msg']}") from None
    strength = form.get("strength")
    try:
        strength = (1.0 if mask is not None else 0.75) if strength is None else float(strength)
    except ValueError:
        raise InvalidRequest("strength", f"strength={strength!r}; expected a number in (0, 1]") from None
    if not 0 < strength <= 1:
        raise InvalidRequest("strength", f"strength={strength}; expected a number in (0, 1]")
    return req, image.convert("RGB"), mask, strength


async def read_file(part, field: str, max_pixels: int) -> Image.Image:
    if not isinstance(part, UploadFile):
        raise InvalidRequest(field, f"{field} is a text field; expected a file part (PNG or JPEG)")
    return read_image(await part.read(), field, max_pixels)


def alpha_mask(image: Image.Image, field: str, required: bool) -> Image.Image | None:
    """OpenAI's mask: fully transparent pixels are edited. As L: 255 edits, 0 keeps."""
    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        if required:
            raise InvalidRequest(field, f"{field} has no alpha channel ({image.mode}); expected a "
                                        "PNG whose fully transparent pixels mark where to edit")
        return None
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")


def resized(image: Image.Image, size: tuple[int, int], mask: Image.Image | None):
    """The image (Lanczos) and mask (nearest: it stays binary) at the request's size."""
    if image.size != size:
        image = image.resize(size, Image.LANCZOS)
        mask = None if mask is None else mask.resize(size, Image.NEAREST)
    return image, mask, to_tensor(image), None if mask is None else to_tensor(mask)
