"""Request bodies: the OpenAI Images API and the AUTOMATIC1111 txt2img subset Lumen serves.

Each model turns into an `Order`: the batch key plus one prompt, negative prompt and seed per
image. Values the engine checks (steps, scales, eta, prompts) are left to the engine, so one
place words those errors; here only what the HTTP APIs add is checked.
"""
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lumen.engine import SamplerConfig

from .jobs import BatchKey

# AUTOMATIC1111 sampler labels (and their k-diffusion aliases) -> Lumen samplers.
A1111_SAMPLERS = {
    "DDIM": ("ddim", ["ddim"]),
    "Euler": ("euler", ["k_euler"]),
    "Euler a": ("euler_ancestral", ["k_euler_a", "k_euler_ancestral"]),
    "Heun": ("heun", ["k_heun"]),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
}
A1111_SCHEDULERS = {"Automatic": None, "Karras": "karras"}  # None: the engine's own spacing
SEED_MAX = 2**63 - 1


class InvalidRequest(ValueError):
    """A request value the HTTP API refuses; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Order:
    """What a request asks the batcher for."""

    key: BatchKey
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    image: Any = None  # [1, 3, H, W] tensor in [0, 1] (image-to-image)
    mask: Any = None  # [1, 1, H, W] tensor in [0, 1], white repaints (inpainting)
    control_images: tuple = ()  # [1, 3, H, W] in [0, 1], one per ControlNet unit of key.control


class OpenAIImageRequest(BaseModel):
    """POST /v1/images/generations, plus Lumen's fields as extra body."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    # OpenAI fields with no effect here; accepted because clients send them.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Lumen's fields.
    negative_prompt: str | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.7
    eta: float = 0.0
    seed: int | None = None
    sampler: str | None = None
    cache_interval: int = 1  # DeepCache (engine.deepcache); 1 is off
    cache_branch_id: int = 0
    # ControlNet (serve.controlnet): base64 control image(s), the ControlNets they are for
    control_image: str | list[str | None] | None = None
    controlnet: str | list[str] | None = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0
    guess_mode: bool = False


class A1111Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img: AUTOMATIC1111's fields Lumen honours; every other field is
    accepted, changes nothing, and is named in the response's info ("ignored")."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    guidance_rescale: float = 0.7  # Lumen's: A1111 has no CFG rescale
    cache_interval: int = 1  # Lumen's: DeepCache (engine.deepcache); 1 is off
    cache_branch_id: int = 0
    # sd_model_checkpoint (the served model, else refused) and CLIP_stop_at_last_layers are
    # applied; other keys are ignored and reported.
    override_settings: dict[str, Any] = Field(default_factory=dict)
    # Features Lumen lacks: their defaults are accepted, anything else is refused.
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = None


def parse_size(size: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    if size is None:
        return default
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size)
    if not match:
        raise InvalidRequest("size", f"size={size!r}; expected 'WIDTHxHEIGHT', e.g. '32x32'")
    return int(match[1]), int(match[2])


def seeds_for(seed: int | None, n: int, param: str = "seed") -> tuple[int, ...]:
    """Image i gets seed + i, as AUTOMATIC1111 does; None or -1 picks a random seed."""
    if seed is None or seed == -1:
        seed = random.randrange(2**32)
    if not 0 <= seed <= SEED_MAX - n:
        raise InvalidRequest(param, f"{param}={seed}; expected -1 (random) or an integer in "
                                    f"[0, {SEED_MAX - n}]")
    return tuple(seed + i for i in range(n))


def check_limits(width: int, height: int, n: int, max_pixels: int, max_images: int,
                 size_param: str, n_param: str) -> None:
    """The server's limits on image size and images per request."""
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidRequest(size_param, f"{size_param} {width}x{height}; expected positive sides "
                                         f"and at most {max_pixels} pixels (the server's max_pixels)")
    if not 1 <= n <= max_images:
        raise InvalidRequest(n_param, f"{n_param}={n} images; expected 1 to {max_images} "
                                      "(the server's max_images)")


def openai_order(req: OpenAIImageRequest, base: SamplerConfig, default_size, max_pixels: int,
                 max_images: int) -> Order:
    width, height = parse_size(req.size, default_size)
    check_limits(width, height, req.n, max_pixels, max_images, "size", "n")
    config = base if req.sampler is None else sampler_config(base, req.sampler, "sampler")
    key = BatchKey(height, width, req.num_inference_steps, config, req.guidance_scale,
                   req.guidance_rescale, req.eta, cache_interval=req.cache_interval,
                   cache_branch_id=req.cache_branch_id)
    negative = req.negative_prompt or ""
    return Order(key, (req.prompt,) * req.n, (negative,) * req.n, seeds_for(req.seed, req.n))


def sampler_config(base: SamplerConfig, sampler: str, param: str, **changes) -> SamplerConfig:
    try:
        return base.replace(sampler=sampler, **changes)
    except ValueError as err:  # names the SamplerConfig field: the sampler or a churn value
        named = re.match(r"(\w+)=", str(err))
        field = param if named is None or named[1] == "sampler" else named[1]
        raise InvalidRequest(field, str(err)) from err


def a1111_sampler(name: str) -> tuple[str, str, str | None]:
    """(A1111 label, Lumen sampler, spacing from a legacy ' Karras' suffix) of a sampler name."""
    wanted = name.strip().lower()
    spacing = None
    if wanted.endswith(" karras"):
        wanted, spacing = wanted.removesuffix(" karras"), "karras"
    for label, (sampler, aliases) in A1111_SAMPLERS.items():
        if wanted in [label.lower(), *aliases]:
            return label, sampler, spacing
    raise InvalidRequest("sampler_name", f"sampler_name={name!r}; expected one of "
                                         f"{', '.join(A1111_SAMPLERS)}")


def a1111_order(req: A1111Txt2ImgRequest, base: SamplerConfig, max_pixels: int,
                max_images: int) -> tuple[Order, str]:
    """The order of a txt2img request and the A1111 label of its sampler."""
    check_a1111_features(req)
    n = req.batch_size * req.n_iter
    check_limits(req.width, req.height, n, max_pixels, max_images, "width x height",
                 "batch_size x n_iter")
    label, sampler, spacing = a1111_sampler(req.sampler_name or req.sampler_index)
    spacing = a1111_spacing(req.scheduler, spacing, base)
    config = sampler_config(base, sampler, "sampler_name", timestep_spacing=spacing,
                            **a1111_churn(req, sampler))
    # A1111 applies eta to DDIM (default 0) and ancestral samplers (default 1) only.
    eta = {"ddim": 0.0, "euler_ancestral": 1.0}.get(sampler)
    eta = 0.0 if eta is None else (eta if req.eta is None else req.eta)
    key = BatchKey(req.height, req.width, req.steps, config, req.cfg_scale, req.guidance_rescale, eta,
                   clip_skip_of(req.override_settings), cache_interval=req.cache_interval,
                   cache_branch_id=req.cache_branch_id)
    return Order(key, (req.prompt,) * n, (req.negative_prompt,) * n, seeds_for(req.seed, n)), label


HONOURED_OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


def ignored_fields(req: A1111Txt2ImgRequest) -> list[str]:
    """The request's fields that change nothing here: for info's "ignored"."""
    overrides = (f"override_settings.{k}" for k in req.override_settings
                 if k not in HONOURED_OVERRIDES)
    return sorted([*(req.model_extra or {}), *overrides])


def clip_skip_of(overrides: dict) -> int | None:
    """CLIP_stop_at_last_layers (1: the last layer) as the engine's clip_skip (layers skipped)."""
    value = overrides.get("CLIP_stop_at_last_layers")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest("override_settings.CLIP_stop_at_last_layers",
                             f"override_settings.CLIP_stop_at_last_layers={value!r}; expected an "
                             "integer >= 1 (1 uses the last layer)")
    return value - 1 or None


def a1111_spacing(scheduler: str | None, from_name: str | None, base: SamplerConfig) -> str:
    if scheduler is None:
        return from_name or base.timestep_spacing
    for label, spacing in A1111_SCHEDULERS.items():
        if scheduler.strip().lower() == label.lower():
            return spacing or from_name or base.timestep_spacing
    raise InvalidRequest("scheduler", f"scheduler={scheduler!r}; expected one of "
                                      f"{', '.join(A1111_SCHEDULERS)}")


def a1111_churn(req: A1111Txt2ImgRequest, sampler: str) -> dict:
    """EDM churn for Euler and Heun, as A1111 passes it; s_tmax = 0 means infinity."""
    if sampler not in ("euler", "heun") or not req.s_churn:
        return {}
    s_tmax = math.inf if not req.s_tmax else req.s_tmax
    s_noise = 1.0 if req.s_noise is None else req.s_noise
    return dict(s_churn=req.s_churn, s_tmin=req.s_tmin or 0.0, s_tmax=s_tmax, s_noise=s_noise)


def check_a1111_features(req: A1111Txt2ImgRequest) -> None:
    unsupported = {"enable_hr": req.enable_hr, "restore_faces": bool(req.restore_faces),
                   "tiling": bool(req.tiling),
                   "alwayson_scripts": bool(set(req.alwayson_scripts) - {"controlnet", "ControlNet"}),
                   "script_name": bool(req.script_name)}
    for name, asked in unsupported.items():
        if asked:
            value = getattr(req, name)
            raise InvalidRequest(name, f"{name}={value!r} asks for a feature Lumen does not have; "
                                       "expected its default (false, null or empty)")
