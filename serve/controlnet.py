"""ControlNet on the server: AUTOMATIC1111's ControlNet extension API and OpenAI's extra fields.

A1111 clients send `alwayson_scripts.controlnet.args`, a list of units: `enabled`, `image` (or
the older `input_image`; base64 PNG or JPEG), `module` (the preprocessor: "none", or "canny",
computed with OpenCV from the `controlnet` extra; others need weights Lumen does not ship and
are refused), `model` (a loaded ControlNet, by name or "name [hash]"), `weight`,
`guidance_start`, `guidance_end`, `control_mode` ("Balanced", or "ControlNet is more important":
diffusers' guess mode), `pixel_perfect`, `resize_mode` ("Just Resize", "Crop and Resize",
"Resize and Fill", or 0-2), `threshold_a`/`threshold_b` (canny's thresholds). The control
image is resized to the output size as `resize_mode` says. `GET /controlnet/model_list`,
`/controlnet/module_list` and `/controlnet/version` answer as the extension does.

OpenAI requests send `control_image` (a base64 PNG or JPEG, or a list with one per ControlNet
named in `controlnet`), and optionally `controlnet` (the loaded ControlNets' names; default:
all of them, in order), `controlnet_conditioning_scale`, `control_guidance_start`,
`control_guidance_end` and `guess_mode`, as Engine.run takes them.
"""
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI
from PIL import Image, ImageOps

from lumen.engine import InvalidInputError
from lumen.engine.controlnet import UNIT_NAMES, per_net, unit_problem

from .img2img import decode_image, to_tensor
from .schemas import InvalidRequest

RESIZE_MODES = {"Just Resize": "resize", "Crop and Resize": "crop", "Resize and Fill": "fill"}
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
SERVED_MODES = {"Balanced": False, "ControlNet is more important": True}  # -> guess_mode
MODULES = ("none", "canny")
VERSION = 2  # the ControlNet extension API version whose unit fields are read here


@dataclass(frozen=True)
class Control:
    """A request's ControlNets, part of its batch key: per ControlNet used, (index, weight,
    guidance start, guidance end); guess_mode for all."""

    units: tuple[tuple[int, float, float, float], ...]
    guess_mode: bool = False
    names: tuple[str, ...] = ()  # the ControlNets' names, for the infotext

    def run_args(self, count: int, images: tuple) -> dict:
        """Engine.run's ControlNet arguments over the engine's `count` ControlNets."""
        control_image: list = [None] * count
        scale, start, end = [0.0] * count, [0.0] * count, [1.0] * count
        for (j, w, s, e), image in zip(self.units, images):
            control_image[j], scale[j], start[j], end[j] = image, w, s, e
        return dict(control_image=control_image if count > 1 else control_image[0],
                    controlnet_conditioning_scale=scale, control_guidance_start=start,
                    control_guidance_end=end, guess_mode=self.guess_mode)


class ControlNets:
    """The served ControlNets: their names and weight hashes, as clients list and name them."""

    def __init__(self, names: list[str], hashes: list[str]):
        self.names, self.hashes = list(names), list(hashes)

    def titles(self) -> list[str]:
        return [f"{n} [{h[:8]}]" for n, h in zip(self.names, self.hashes)]

    def index(self, name, param: str) -> int:
        for j, (plain, title) in enumerate(zip(self.names, self.titles())):
            if name in (plain, title):
                return j
        served = ", ".join(repr(t) for t in self.titles()) or "none"
        raise InvalidRequest(param, f"{param}={name!r}; expected a loaded ControlNet ({served})")

    def unit(self, name, param: str, units: list) -> int:
        """The index of the ControlNet a request's next unit names; each ControlNet once."""
        j = self.index(name, param)
        if any(j == u[0] for u in units):
            raise InvalidRequest(param, f"{param}={name!r} names a ControlNet an earlier unit "
                                        "uses; expected each ControlNet once")
        return j


def a1111_control(alwayson: dict, nets: ControlNets, size: tuple[int, int],
                  max_pixels: int) -> tuple[Control | None, tuple]:
    """(Control, control images) of an A1111 payload's ControlNet units; (None, ()) without."""
    script = alwayson.get("controlnet") or alwayson.get("ControlNet")
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet.args", "alwayson_scripts.controlnet: "
                             "expected {\"args\": [unit, ...]}, the ControlNet extension's shape")
    units, images, modes = [], [], set()
    for i, unit in enumerate(args):
        param = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise InvalidRequest(param, f"{param} is {type(unit).__name__}; expected a unit object")
        if not unit.get("enabled", True):
            continue
        j = nets.unit(unit.get("model"), f"{param}.model", units)
        data = unit.get("image", unit.get("input_image"))
        if isinstance(data, dict):  # the extension's {"image": ..., "mask": ...} form
            data = data.get("image")
        if not isinstance(data, str) or not data:
            raise InvalidRequest(f"{param}.image", f"{param}.image is missing; expected a base64 "
                                                   "PNG or JPEG control image")
        image = decode_image(data, f"{param}.image", max_pixels)
        image = resize(image, size, resize_mode(unit.get("resize_mode", "Crop and Resize"), param))
        images.append(to_tensor(preprocess(image, unit, param)))
        modes.add(control_mode(unit.get("control_mode", "Balanced"), param))
        units.append(checked(j, *(number(unit, name, default, param) for name, default in
                                  (("weight", 1.0), ("guidance_start", 0.0), ("guidance_end", 1.0))),
                             names=(f"{param}.weight", f"{param}.guidance_start",
                                    f"{param}.guidance_end")))
    if not units:
        return None, ()
    if len(modes) > 1:
        raise InvalidRequest("alwayson_scripts.controlnet.args", "units with different "
                             "control_mode; expected one mode for the request's units")
    return Control(tuple(units), modes.pop(), tuple(nets.names[u[0]] for u in units)), tuple(images)


def openai_control(body, nets: ControlNets, size: tuple[int, int],
                   max_pixels: int) -> tuple[Control | None, tuple]:
    """(Control, control images) of an OpenAI request's extra fields; (None, ()) without."""
    if body.control_image is None:
        return None, ()
    names = body.controlnet if body.controlnet is not None else list(nets.names)
    names = [names] if isinstance(names, str) else list(names)
    data = body.control_image if isinstance(body.control_image, list) else [body.control_image]
    if len(data) != len(names):
        raise InvalidRequest("control_image", f"{len(data)} control images for {len(names)} "
                                              f"ControlNets ({', '.join(names) or 'none loaded'}); "
                                              "expected one per ControlNet (name them in controlnet)")
    values = [per_name(body, field, len(names)) for field in UNIT_NAMES]
    units, images = [], []
    for k, (name, item) in enumerate(zip(names, data)):
        if item is None:
            continue
        j = nets.unit(name, "controlnet" if len(names) == 1 else f"controlnet[{k}]", units)
        param = "control_image" if len(data) == 1 else f"control_image[{k}]"
        images.append(to_tensor(resize(decode_image(item, param, max_pixels), size, "crop")))
        units.append(checked(j, *(v[k] for v in values)))
    if not units:
        return None, ()
    return Control(tuple(units), bool(body.guess_mode), tuple(nets.names[u[0]] for u in units)), \
        tuple(images)


def per_name(body, field: str, n: int) -> list:
    """An OpenAI field's value per named ControlNet (one for all, or a list of n)."""
    try:
        return per_net(field, getattr(body, field), n)
    except InvalidInputError as err:
        raise InvalidRequest(field, str(err)) from err


def checked(j: int, scale, start, end, names: tuple = UNIT_NAMES) -> tuple:
    """A unit (j, scale, start, end), refused as the engine would, naming the client's field."""
    problem = unit_problem(scale, start, end, names)
    if problem is not None:
        raise InvalidRequest(*problem)
    return j, float(scale), float(start), float(end)


def number(unit: dict, name: str, default: float, param: str) -> float:
    value = unit.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{param}.{name}", f"{param}.{name}={value!r}; expected a number")
    return float(value)


def labelled(value, labels: tuple, served: dict, param: str, field: str, indices: str):
    """A unit's labelled choice (a label, or its index in labels) as served[label]."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(labels):
        value = labels[value]
    if value not in served:
        raise InvalidRequest(f"{param}.{field}", f"{param}.{field}={value!r}; expected one of "
                                                 f"{', '.join(served)} (or {indices})")
    return served[value]


def resize_mode(value, param: str) -> str:
    return labelled(value, tuple(RESIZE_MODES), RESIZE_MODES, param, "resize_mode", "0-2")


def control_mode(value, param: str) -> bool:
    return labelled(value, CONTROL_MODES, SERVED_MODES, param, "control_mode", "0, 2")


def resize(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """The control image at size (width, height): stretched ("resize"), scaled to cover and
    centre-cropped ("crop"), or scaled to fit and padded with black ("fill")."""
    if image.size == size:
        return image
    if mode == "resize":
        return image.resize(size, Image.LANCZOS)
    if mode == "crop":
        return ImageOps.fit(image, size, Image.LANCZOS)
    return ImageOps.pad(image, size, Image.LANCZOS, color=(0, 0, 0))


def preprocess(image: Image.Image, unit: dict, param: str) -> Image.Image:
    """The unit's preprocessor: "none" passes the image, "canny" draws OpenCV's edges."""
    module = unit.get("module", "none")
    if module in (None, "none", "None"):
        return image
    if module != "canny":
        raise InvalidRequest(f"{param}.module", f"{param}.module={module!r} needs a preprocessor "
                                                f"model Lumen does not ship; expected one of "
                                                f"{', '.join(MODULES)} (or a preprocessed image "
                                                "with module 'none')")
    try:
        import cv2
    except ImportError:
        raise InvalidRequest(f"{param}.module", f"{param}.module='canny' needs OpenCV, which is "
                                                "not installed (pip install 'lumen[controlnet]'); "
                                                "expected module 'none'") from None
    low = number(unit, "threshold_a", 100.0, param)
    high = number(unit, "threshold_b", 200.0, param)
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges).convert("RGB")


def add_controlnet_routes(app: FastAPI, nets) -> None:
    """The ControlNet extension's listings; nets() gives the served ControlNets."""

    @app.get("/controlnet/version")
    async def version():
        return {"version": VERSION}

    @app.get("/controlnet/model_list")
    async def model_list():
        return {"model_list": nets().titles()}

    @app.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False):
        detail: dict[str, Any] = {m: {"model_free": False, "sliders": []} for m in MODULES}
        detail["canny"]["sliders"] = [{"name": "Low Threshold", "value": 100, "min": 1, "max": 255},
                                      {"name": "High Threshold", "value": 200, "min": 1, "max": 255}]
        return {"module_list": list(MODULES), "module_detail": detail}

