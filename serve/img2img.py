"""AUTOMATIC1111's POST /sdapi/v1/img2img: image-to-image and inpainting on the step scheduler.

A1111's payload: `init_images` (base64 PNG or JPEG, a data-URL prefix allowed), `mask`,
`denoising_strength`, `mask_blur`, `inpainting_mask_invert`, `inpainting_fill` (1 "original"
and 2 "latent noise"), `resize_mode` 0 (just resize), `inpaint_full_res` false, `include_init_images`, and
every txt2img field. As A1111 does, the image and mask are resized to width x height, the mask
is blurred by `mask_blur`, int(steps * denoising_strength) steps run, and the original is
overlaid on the kept region of each result through the blurred mask.
"""
import base64
import binascii
import io

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from pydantic import Field

from .schemas import A1111Txt2ImgRequest, InvalidRequest

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
SERVED_FILLS = {1: "original", 2: "noise"}  # inpainting_fill -> Engine.run's masked_content


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the image ones Lumen honours."""

    init_images: list[str] = Field(min_length=1)
    mask: str | None = None
    denoising_strength: float = 0.75
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    resize_mode: int = 0
    include_init_images: bool = False


def b64_bytes(data: str, field: str, expected: str) -> bytes:
    """The bytes of a base64 string (a data: URL prefix allowed), or a 422 naming field."""
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, f"{field} is not valid base64; expected {expected} "
                                    "(a data:image/png;base64, prefix is allowed)") from None


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    """A base64 PNG or JPEG (a data: URL prefix allowed) as a PIL image, checked."""
    return read_image(b64_bytes(data, field, "a base64 PNG or JPEG"), field, max_pixels)


def read_image(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    """PNG or JPEG bytes as a loaded PIL image, at most max_pixels; else a 422 naming field."""
    try:
        image = Image.open(io.BytesIO(raw))
        if image.format not in ("PNG", "JPEG"):
            raise InvalidRequest(field, f"{field} is a {image.format} image; expected PNG or JPEG")
        if image.width * image.height > max_pixels:
            raise InvalidRequest(field, f"{field} is {image.width}x{image.height}; expected at "
                                        f"most {max_pixels} pixels (the server's max_pixels)")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise InvalidRequest(field, f"{field} is not a readable PNG or JPEG image ({err})") from None
    return image


def check_img2img(req: A1111Img2ImgRequest) -> None:
    """Values Lumen does not serve get a 422 naming the field (the inpainting fields only with a
    mask: A1111 ignores them without one)."""
    if req.mask is not None and req.inpainting_fill not in SERVED_FILLS:
        raise InvalidRequest("inpainting_fill", f"inpainting_fill={req.inpainting_fill} "
                             f"({FILLS.get(req.inpainting_fill, 'unknown')}); expected 1 (original: "
                             "the masked region starts from the image) or 2 (latent noise)")
    if req.resize_mode != 0:
        raise InvalidRequest("resize_mode", f"resize_mode={req.resize_mode}; expected 0 (just resize)")
    if req.mask is not None and req.inpaint_full_res:
        raise InvalidRequest("inpaint_full_res", "inpaint_full_res=true; expected false (the whole "
                                                 "picture is inpainted)")
    if not 0 < req.denoising_strength <= 1:
        raise InvalidRequest("denoising_strength", f"denoising_strength={req.denoising_strength}; "
                                                   "expected a number in (0, 1]")
    if int(req.steps * req.denoising_strength) < 1:
        raise InvalidRequest("denoising_strength", f"denoising_strength={req.denoising_strength} "
                             f"with steps={req.steps}: int(steps * denoising_strength) = 0 steps "
                             "would run; expected more steps or more strength")


def img2img_inputs(req: A1111Img2ImgRequest, max_pixels: int):
    """(init image, blurred mask or None) resized to width x height, as PIL images; the
    engine's image (a [1, 3, H, W] tensor in [0, 1]) and mask ([1, 1, H, W], white repaints)."""
    check_img2img(req)
    if len(req.init_images) > 1:
        raise InvalidRequest("init_images", f"{len(req.init_images)} init_images; expected one "
                                            "(it serves every image of the request)")
    size = (req.width, req.height)
    init = decode_image(req.init_images[0], "init_images[0]", max_pixels).convert("RGB")
    init = init.resize(size, Image.LANCZOS) if init.size != size else init
    mask = None
    if req.mask is not None:
        mask = decode_image(req.mask, "mask", max_pixels).convert("L")
        mask = mask.resize(size, Image.LANCZOS) if mask.size != size else mask
        if req.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        if req.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(req.mask_blur))
    return init, mask


def to_tensor(image: Image.Image) -> torch.Tensor:
    """[1, C, H, W] fp32 in [0, 1] of a PIL image (RGB or L)."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def overlay(images: list, init: Image.Image, mask: Image.Image | None) -> list:
    """A1111's overlay: the original where the (blurred) mask keeps, the result where it repaints."""
    if mask is None:
        return images
    return [Image.composite(image.convert("RGB"), init, mask) for image in images]
