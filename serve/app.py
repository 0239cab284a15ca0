"""The FastAPI app: OpenAI and AUTOMATIC1111 image endpoints over one engine and its batcher."""
import asyncio
import dataclasses
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lumen.engine import InvalidInputError, LumenError, slots

from . import errors
from .a1111 import (UNSERVED, Checkpoint, add_a1111_routes, cmd_flags, lora_items, vae_items,
                    weights_sha256)
from .batcher import POLICIES, Batcher
from .controlnet import ControlNets, a1111_control, add_controlnet_routes, openai_control
from .jobs import BatchKey, Interrupted, Job, ModelError, prepare
from .http import AuthMiddleware, Metrics, MetricsMiddleware
from .edits import edit_form, resized
from .img2img import SERVED_FILLS, A1111Img2ImgRequest, img2img_inputs, overlay, to_tensor
from .output import encode, infotext, png_base64
from .schemas import (A1111Txt2ImgRequest, InvalidRequest, OpenAIImageRequest, Order, a1111_order,
                      ignored_fields, openai_order)

OPENAI_IMAGES, A1111_TXT2IMG = "/v1/images/generations", "/sdapi/v1/txt2img"
A1111_IMG2IMG, OPENAI_EDITS = "/sdapi/v1/img2img", "/v1/images/edits"
A1111_INFO = ("samplers", "schedulers", "sd-models", "options", "upscalers", "latent-upscale-modes",
              "sd-vae", "loras", "embeddings", "hypernetworks", "face-restorers", "prompt-styles",
              "scripts", "script-info", "realesrgan-models", "cmd-flags", "memory",
              "refresh-checkpoints", "refresh-vae", "refresh-loras", "png-info", "progress",
              "interrupt", "skip")
ENDPOINTS = (OPENAI_IMAGES, OPENAI_EDITS, A1111_TXT2IMG, A1111_IMG2IMG, "/v1/models", *(f"/sdapi/v1/{n}" for n in A1111_INFO),
             *UNSERVED, "/health", "/metrics")


@dataclass(frozen=True)
class Limits:
    """What one server accepts; see `lumen serve --help`."""

    max_batch: int = 8  # images in the running batch (rows of one UNet call: twice that with CFG)
    batch_wait_ms: float = 10.0  # how long the oldest request waits for company on an idle server
    batching: str = "step"  # "step": join at step boundaries; "request": whole-request batches
    preview_every: int = 0  # decode the progress preview every N steps (0: never)
    max_queue: int = 64  # images waiting; past it, 429
    timeout_s: float = 300.0  # request age past which it gets 504
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_images: int | None = None  # images per request (default and at most max_batch)
    max_body_bytes: int = 1 << 20
    api_key: str | None = None

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_pixels", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name}={value!r}; expected an integer >= 1")
        if self.max_images is not None and not 1 <= self.max_images <= self.max_batch:
            raise InvalidInputError(f"max_images={self.max_images}; expected 1 to max_batch="
                                    f"{self.max_batch} (a request never spans two batches)")
        if self.batching not in POLICIES:
            raise InvalidInputError(f"batching={self.batching!r}; expected one of "
                                    f"{', '.join(POLICIES)}")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) \
                or self.preview_every < 0:
            raise InvalidInputError(f"preview_every={self.preview_every!r}; expected an integer "
                                    ">= 0 (0: no previews)")
        if not (self.batch_wait_ms >= 0 and self.timeout_s > 0):
            raise InvalidInputError(f"batch_wait_ms={self.batch_wait_ms}, timeout_s={self.timeout_s}; "
                                    "expected batch_wait_ms >= 0 and timeout_s > 0")
        if self.api_key is not None and not self.api_key:
            raise InvalidInputError("api_key=''; expected a non-empty key or None")

    @property
    def images_per_request(self) -> int:
        return self.max_images or self.max_batch


def model_label(model: str) -> str:
    """The name clients see: a built-in name, or a folder's own name (never its path)."""
    return model if model in ("default", "flawed") else Path(model).name


def default_size(engine) -> tuple[int, int]:
    """(width, height) the model was trained at."""
    size = engine.components.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    side = size * engine.components.vae_scale_factor
    return side, side


def warm_up(engine, step_graphs=None) -> None:
    """One small request through the serving path (text encoder, steps, decode) before serving;
    with step graphs, the first one (one CFG image at the default size) is captured here."""
    width, height = default_size(engine)
    key = BatchKey(height, width, 2, engine.config, 7.5, 0.7, 0.0)
    running = slots.split(engine, prepare(engine, Job(key, ("",), ("",), (0,))))
    while not running[0].done:
        slots.tick(engine, running, graphs=step_graphs)
    slots.finish(engine, running, "pil")


def create_app(engine, model_name: str = "lumen", warmup: bool = True, lora=None,
               flags: dict | None = None, controlnet_names: list[str] | None = None,
               **limits) -> FastAPI:
    """The ASGI app serving `engine`; limits are Limits' fields. Serve it with uvicorn.

    lora: the `lora=` the engine was built with (named in A1111's /sdapi/v1/loras); flags: the
    server's start-up flags (A1111's /sdapi/v1/cmd-flags); controlnet_names: what clients call
    the engine's ControlNets (default "controlnet", or "controlnet_0", "controlnet_1", ...)."""
    names = controlnet_labels(engine, controlnet_names)
    limits = Limits(**limits)
    metrics = Metrics(limits.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(engine, limits.max_batch, limits.batch_wait_ms, limits.max_queue,
                          limits.timeout_s, on_batch=metrics.on_batch, policy=limits.batching,
                          preview_every=limits.preview_every, on_admit=metrics.queue_wait.observe)
        metrics.queue.set_function(lambda: batcher.waiting_images)
        app.state.batcher = batcher
        try:
            sha256 = await asyncio.wrap_future(batcher.call(
                lambda: weights_sha256(engine.components.unet)))
            app.state.checkpoint = Checkpoint(model_name, sha256)
            hashes = await asyncio.wrap_future(batcher.call(
                lambda: [weights_sha256(net) for net in engine.components.controlnets]))
            app.state.controlnets = ControlNets(names, hashes)
            if warmup:
                await asyncio.wrap_future(batcher.call(lambda: warm_up(engine, batcher.step_graphs)))
            app.state.ready = True
            yield
        finally:
            app.state.ready = False  # uvicorn has stopped accepting: drain what is queued
            await anyio.to_thread.run_sync(batcher.stop)

    app = FastAPI(title="Lumen", lifespan=lifespan, max_body_size=limits.max_body_bytes)
    app.state.ready, app.state.metrics, app.state.limits = False, metrics, limits
    errors.install(app)
    app.state.controlnets = ControlNets(names, [""] * len(names))
    add_image_routes(app, engine, model_name, limits)
    add_controlnet_routes(app, lambda: app.state.controlnets)
    add_info_routes(app, model_name, metrics)
    add_a1111_routes(app, lambda: app.state.checkpoint, lora_items(lora, engine.components.loras),
                     cmd_flags(model=model_name, **dataclasses.asdict(limits), **(flags or {})),
                     vae_items(engine, model_name))
    if limits.api_key is not None:
        app.add_middleware(AuthMiddleware, api_key=limits.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=ENDPOINTS)  # outermost
    return app


def add_image_routes(app: FastAPI, engine, model_name: str, limits: Limits) -> None:
    size = default_size(engine)

    @app.post(OPENAI_IMAGES)
    async def openai_images(body: OpenAIImageRequest, request: Request):
        check_model(body.model, model_name)
        order = openai_order(body, engine.config, size, limits.max_pixels, limits.images_per_request)
        control = await anyio.to_thread.run_sync(
            openai_control, body, request.app.state.controlnets, (order.key.width, order.key.height),
            limits.max_pixels)
        return await openai_answer(request, with_control(order, *control))

    async def openai_answer(request: Request, order: Order, finish=None) -> dict:
        """Run an OpenAI order; OpenAI's answer (created, data with b64_json and seed)."""
        images, stopped = await generate(request, engine, order, limits)
        if stopped:  # the images API has no way to flag a partial image: refuse it
            raise Interrupted(f"{stopped} by POST /sdapi/v1/{stopped.removesuffix('ed')} at a "
                              "step boundary")
        images = finish(images) if finish is not None else images
        texts = [infotext(p, n, order.key, s, model_name)
                 for p, n, s in zip(order.prompts, order.negative_prompts, order.seeds)]
        pngs = await anyio.to_thread.run_sync(encode, images, texts)
        return {"created": int(time.time()),
                "data": [{"b64_json": png, "seed": seed} for png, seed in zip(pngs, order.seeds)]}

    @app.post(OPENAI_EDITS)
    async def openai_edits(request: Request):
        body, image, mask, strength = await edit_form(await request.form(), limits.max_pixels)
        check_model(body.model, model_name)
        order = openai_order(body, engine.config, size, limits.max_pixels, limits.images_per_request)
        image, mask, pixels, mask_pixels = resized(image, (order.key.width, order.key.height), mask)
        order = dataclasses.replace(order, image=pixels, mask=mask_pixels,
                                    key=dataclasses.replace(order.key, strength=strength,
                                                            inpaint=mask is not None))
        return await openai_answer(request, order, lambda images: overlay(images, image, mask))

    @app.post(A1111_TXT2IMG)
    async def txt2img(body: A1111Txt2ImgRequest, request: Request):
        check_checkpoint(request, body)
        order, label = a1111_order(body, engine.config, limits.max_pixels, limits.images_per_request)
        order = await a1111_with_control(request, body, order)
        return await a1111_generate(request, body, order, label)

    @app.post(A1111_IMG2IMG)
    async def img2img(body: A1111Img2ImgRequest, request: Request):
        check_checkpoint(request, body)
        order, label = a1111_order(body, engine.config, limits.max_pixels, limits.images_per_request)
        init, mask = await anyio.to_thread.run_sync(img2img_inputs, body, limits.max_pixels)
        key = dataclasses.replace(order.key, strength=body.denoising_strength,
                                  inpaint=mask is not None,
                                  masked_content=SERVED_FILLS[body.inpainting_fill] if mask else "original")
        order = dataclasses.replace(order, key=key, image=to_tensor(init),
                                    mask=None if mask is None else to_tensor(mask))
        order = await a1111_with_control(request, body, order)
        extra = [png_base64(init, "init image")] if body.include_init_images else []
        return await a1111_generate(request, body, order, label,
                                    lambda images: overlay(images, init, mask), extra)

    async def a1111_with_control(request: Request, body, order: Order) -> Order:
        if not body.alwayson_scripts:
            return order
        control = await anyio.to_thread.run_sync(
            a1111_control, body.alwayson_scripts, request.app.state.controlnets,
            (order.key.width, order.key.height), limits.max_pixels)
        return with_control(order, *control)

    async def a1111_generate(request: Request, body, order: Order, label: str, finish=None,
                             extra: list | None = None) -> dict:
        """Run an A1111 order; the response A1111 gives (images, parameters, info JSON)."""
        try:  # A1111 answers an interrupted or skipped job with its current x0 estimates
            images, stopped = await generate(request, engine, order, limits)
        except Interrupted:  # before its first step: nothing yet
            images, stopped = [], "interrupted"
        images = finish(images) if finish is not None and images else images
        texts = [infotext(p, n, order.key, s, model_name)
                 for p, n, s in zip(order.prompts, order.negative_prompts, order.seeds)]
        pngs = await anyio.to_thread.run_sync(encode, images, texts[:len(images)])
        info = a1111_info(body, order, label, texts, model_name)
        info.update(interrupted=stopped == "interrupted", skipped=stopped == "skipped",
                    ignored=ignored_fields(body))
        return {"images": pngs + (extra or []), "parameters": body.model_dump(),
                "info": json.dumps(info)}


def with_control(order: Order, control, images: tuple) -> Order:
    """The order with its ControlNet units in its key and their control images beside it."""
    if control is None:
        return order
    return dataclasses.replace(order, key=dataclasses.replace(order.key, control=control),
                               control_images=images)


def controlnet_labels(engine, names: list[str] | None) -> list[str]:
    count = len(engine.components.controlnets)
    if names is None:
        return ["controlnet"] if count == 1 else [f"controlnet_{j}" for j in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise InvalidInputError(f"controlnet_names={names!r}; expected {count} distinct names, one "
                                "per ControlNet of the engine")
    return list(names)


def check_model(model: str | None, served: str) -> None:
    """An OpenAI request's `model` must be the served one (or left out)."""
    if model not in (None, served):
        raise InvalidRequest("model", f"model={model!r}; this server serves only {served!r}")


def check_checkpoint(request: Request, body: A1111Txt2ImgRequest) -> None:
    """override_settings.sd_model_checkpoint must name the served model."""
    if "sd_model_checkpoint" in body.override_settings:
        request.app.state.checkpoint.check(body.override_settings["sd_model_checkpoint"],
                                           "override_settings.sd_model_checkpoint")


def a1111_info(body: A1111Txt2ImgRequest, order: Order, label: str, texts: list[str],
               model_name: str) -> dict:
    """A1111's info: a JSON string with the seeds used and the settings."""
    key = order.key
    return {"prompt": body.prompt, "all_prompts": list(order.prompts),
            "negative_prompt": body.negative_prompt, "all_negative_prompts": list(order.negative_prompts),
            "seed": order.seeds[0], "all_seeds": list(order.seeds), "subseed": -1,
            "all_subseeds": [-1] * len(order.seeds), "width": key.width, "height": key.height,
            "sampler_name": label, "scheduler": body.scheduler or "Automatic", "steps": key.steps,
            "cfg_scale": key.guidance_scale, "guidance_rescale": key.guidance_rescale, "eta": key.eta,
            "batch_size": body.batch_size, "n_iter": body.n_iter, "sd_model_name": model_name,
            "infotexts": texts, "index_of_first_image": 0, "timestep_spacing": key.config.timestep_spacing}


async def generate(request: Request, engine, order: Order, limits: Limits) -> tuple[list, str | None]:
    """Check the order with the engine, queue it, wait for its images (or time out, or drop it).

    Returns the images and how the job ended early ("interrupted", "skipped") or None."""
    request.state.images = len(order.seeds)
    batcher: Batcher = request.app.state.batcher
    with batcher.admitted() as epoch:
        job = Job(order.key, order.prompts, order.negative_prompts, order.seeds, image=order.image,
                  mask=order.mask, control_images=order.control_images)
        job.request = await asyncio.wrap_future(batcher.call(lambda: check_with_engine(engine, job)))
        images = await wait_for(request, job, asyncio.wrap_future(batcher.submit(job, epoch)), limits)
        return images, job.stopped


async def wait_for(request: Request, job: Job, future, limits: Limits) -> list:
    """The job's images, or TimeoutError past timeout_s, or Disconnected when the client left."""
    deadline = job.created + limits.timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel()
            raise TimeoutError(f"request took longer than timeout_s={limits.timeout_s}")
        done, _ = await asyncio.wait({future}, timeout=min(0.25, remaining))
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel()
            raise errors.Disconnected("client disconnected before its images were ready")


def check_with_engine(engine, job: Job) -> dict:
    """The engine's own checks of the request (values, prompts), before any UNet call; returns
    the prepared inputs (text rows, plan, noise), so the job joins without encoding again."""
    try:
        return prepare(engine, job)
    except LumenError:
        raise
    except (RuntimeError, MemoryError) as err:
        raise ModelError(f"{type(err).__name__}: {err}") from err


def add_info_routes(app: FastAPI, model_name: str, metrics: Metrics) -> None:
    @app.get("/health")
    async def health(request: Request):
        if not request.app.state.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lumen"}]}
