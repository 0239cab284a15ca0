"""AUTOMATIC1111's API around txt2img: options, the lists, png-info, progress, interrupt, skip.

Every answer is the honest one for this server, in A1111's JSON shape: one model, fixed at
start-up; its own VAE; the LoRAs fused at start-up; no upscalers, styles, scripts, embeddings
or hypernetworks. An A1111 endpoint Lumen does not serve answers 404 with a message that
names it, never a body a client could read as data.
"""
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from .errors import NotServed
from .img2img import b64_bytes
from .output import png_base64
from .schemas import A1111_SAMPLERS, A1111_SCHEDULERS, InvalidRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A1111 endpoints that ask for what Lumen lacks; each answers 404 naming the feature.
UNSERVED = {
    "/sdapi/v1/extra-single-image": "upscaling and face restoration (extras)",
    "/sdapi/v1/extra-batch-images": "upscaling and face restoration (extras)",
    "/sdapi/v1/interrogate": "CLIP/DeepBooru interrogation",
    "/sdapi/v1/create/embedding": "training", "/sdapi/v1/create/hypernetwork": "training",
    "/sdapi/v1/train/embedding": "training", "/sdapi/v1/train/hypernetwork": "training",
    "/sdapi/v1/reload-checkpoint": "loading another model",
    "/sdapi/v1/unload-checkpoint": "unloading the model",
}


@dataclass(frozen=True)
class Checkpoint:
    """The served model as A1111 lists a checkpoint: its name and the sha256 of its UNet weights."""

    model_name: str
    sha256: str

    @property
    def hash(self) -> str:
        return self.sha256[:10]  # A1111's short hash

    @property
    def title(self) -> str:
        return f"{self.model_name} [{self.hash}]"

    def names(self) -> tuple[str, ...]:
        """What a client may call it: A1111 looks checkpoints up by each of these."""
        return self.title, self.model_name, self.hash, self.sha256

    def item(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash,
                "sha256": self.sha256, "filename": self.model_name, "config": None}

    def check(self, name, param: str) -> None:
        """A request naming a model: the served one passes, any other is refused by name."""
        if name not in self.names():
            raise InvalidRequest(param, f"{param}={name!r}; this server serves only {self.title!r} "
                                        "(the model is fixed at start-up)")


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict, names and bytes in order: the same weights, the same hash."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def memory() -> dict:
    """GET /sdapi/v1/memory: RAM of this machine, and CUDA memory when there is a GPU."""
    ram = ram_bytes()
    out = {"ram": {"free": ram["free"], "used": ram["total"] - ram["free"], "total": ram["total"]}}
    if not torch.cuda.is_available():
        out["cuda"] = {"error": "unavailable"}
        return out
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}
    out["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                   "active": pair("active_bytes"), "allocated": pair("allocated_bytes"),
                   "reserved": pair("reserved_bytes"), "inactive": pair("inactive_split_bytes"),
                   "events": {"retries": stats.get("num_alloc_retries", 0),
                              "oom": stats.get("num_ooms", 0)}}
    return out


def ram_bytes() -> dict:
    """{"free", "total"} in bytes: psutil when installed, else /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if k in ("MemTotal", "MemAvailable")}
        return {"free": kib["MemAvailable"], "total": kib["MemTotal"]}
    vm = psutil.virtual_memory()
    return {"free": vm.available, "total": vm.total}


# ---------------------------------------------------------------------------------------------
# png-info: A1111's "parameters" text back into its fields

PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict:
    """A1111's parse_generation_parameters: Prompt, Negative prompt, then each "Name: value" of
    the last line as a string; "Size: WxH" becomes Size-1 and Size-2."""
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:  # no settings line
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for name, value in PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        size = IMAGE_SIZE.match(value)
        if size:
            out[f"{name}-1"], out[f"{name}-2"] = size[1], size[2]
        else:
            out[name] = value
    out.setdefault("Clip skip", "1")
    return out


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    image: str


def png_info(data: str) -> dict:
    """POST /sdapi/v1/png-info: the text chunks of a base64 PNG (a data: URL prefix allowed)."""
    raw = decode_png(data)
    with Image.open(io.BytesIO(raw)) as image:
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    info = items.pop("parameters", "")
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}


def decode_png(data: str) -> bytes:
    raw = b64_bytes(data, "image", "a base64 PNG")
    if not raw.startswith(PNG_SIGNATURE):
        raise InvalidRequest("image", f"image starts with {raw[:8]!r}, not a PNG signature; "
                                      "expected a base64 PNG")
    try:
        Image.open(io.BytesIO(raw)).verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InvalidRequest("image", f"image is not a readable PNG ({err})") from None
    return raw


# ---------------------------------------------------------------------------------------------
# options and txt2img's override_settings

SETTABLE = ("sd_model_checkpoint",)  # checked; every other key is ignored and reported


def options(checkpoint: Checkpoint) -> dict:
    """GET /sdapi/v1/options: the settings clients read, with this server's values."""
    return {"sd_model_checkpoint": checkpoint.title, "sd_checkpoint_hash": checkpoint.sha256,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0,
            "eta_ancestral": 1.0, "samples_format": "png", "sd_checkpoints_limit": 1,
            "live_previews_enable": False, "show_progress_every_n_steps": -1}


def set_options(body: dict, checkpoint: Checkpoint) -> dict:
    """POST /sdapi/v1/options: sd_model_checkpoint must name the served model (a no-op); other
    keys change nothing, and those that would have (unknown, or another value) are reported."""
    if "sd_model_checkpoint" in body:
        checkpoint.check(body["sd_model_checkpoint"], "sd_model_checkpoint")
    current = options(checkpoint)
    return {"ignored": sorted(k for k, v in body.items()
                              if k not in SETTABLE and (k not in current or current[k] != v))}


# ---------------------------------------------------------------------------------------------
# routes


def lora_items(lora, provenance: tuple) -> list[dict]:
    """GET /sdapi/v1/loras: the LoRAs fused at start-up (lora= as engine.build took it, and the
    engine's provenance of each, in the same order), named by file, never by path."""
    from lumen.engine.lora import parse_loras

    names = [spec.path.stem for spec in parse_loras(lora)] if lora else []
    names += [f"lora_{p['sha256'][:10]}" for p in provenance[len(names):]]
    return [{"name": name, "alias": name, "path": name,
             "metadata": {"scale": p["scale"], "sha256": p["sha256"], "fused": True}}
            for name, p in zip(names, provenance)]


def vae_items(engine, model_name: str) -> list[dict]:
    """GET /sdapi/v1/sd-vae: the model's own VAE (none for a pixel-space model)."""
    if engine.components.vae is None:
        return []
    return [{"model_name": f"{model_name} VAE", "filename": f"{model_name}/vae"}]


def add_a1111_routes(app: FastAPI, checkpoint, loras: list[dict], flags: dict,
                     vaes: list[dict]) -> None:
    """Every A1111 endpoint but txt2img; checkpoint() gives the served model's Checkpoint."""

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [checkpoint().item()]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return options(checkpoint())

    @app.post("/sdapi/v1/options")
    async def post_options(body: dict):
        return set_options(body, checkpoint())

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": label, "aliases": aliases, "options": {}}
                for label, (_, aliases) in A1111_SAMPLERS.items()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": label.lower(), "label": label, "aliases": None,
                 "default_rho": -1, "need_inner_model": False} for label in A1111_SCHEDULERS]

    lists = {
        "upscalers": [{"name": "None", "model_name": None, "model_path": None, "model_url": None,
                       "scale": 4}],
        "latent-upscale-modes": [], "hypernetworks": [], "face-restorers": [],
        "prompt-styles": [], "sd-vae": vaes, "realesrgan-models": [],
        "embeddings": {"loaded": {}, "skipped": {}},
        "scripts": {"txt2img": [], "img2img": []}, "script-info": [],
        "loras": loras, "cmd-flags": flags,
    }
    for name, value in lists.items():
        app.add_api_route(f"/sdapi/v1/{name}", constant(value), methods=["GET"])
    for name in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        app.add_api_route(f"/sdapi/v1/{name}", constant(None), methods=["POST"])

    @app.get("/sdapi/v1/memory")
    async def get_memory():
        return memory()

    @app.post("/sdapi/v1/png-info")
    async def post_png_info(body: PngInfoRequest):
        return png_info(body.image)

    @app.get("/sdapi/v1/progress")
    async def get_progress(request: Request):
        return progress(request.app.state.batcher)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        request.app.state.batcher.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip(request: Request):
        request.app.state.batcher.skip()

    for path, feature in UNSERVED.items():
        app.add_api_route(path, unserved(path, feature), methods=["GET", "POST"])


def constant(value):
    async def route():
        return value
    return route


def unserved(path: str, feature: str):
    async def route():
        raise NotServed(f"{path} asks for {feature}, which this server does not serve")
    return route


def progress(batcher) -> dict:
    """GET /sdapi/v1/progress from the scheduler: the oldest running request's step, the
    requests in the server, and its preview (a base64 PNG of the x0 estimate) with --preview-every."""
    state, jobs = batcher.progress()
    done = state.step / state.steps if state.steps else 0.0
    elapsed = time.monotonic() - state.started if state.steps else 0.0
    eta = elapsed / done - elapsed if done else 0.0
    preview = None if state.preview is None else png_base64(
        state.preview, f"x0 estimate at step {state.step} of {state.steps}")
    return {"progress": done, "eta_relative": eta,
            "state": {"skipped": state.skipped, "interrupted": state.interrupted,
                      "stopping_generation": False,
                      "job": f"job {state.job_no}" if state.steps else "",
                      "job_count": jobs, "job_timestamp": "0", "job_no": 0,
                      "sampling_step": state.step, "sampling_steps": state.steps},
            "current_image": preview, "textinfo": None}


def cmd_flags(**flags) -> dict:
    """GET /sdapi/v1/cmd-flags: the server's start-up flags, A1111's always-true API flags added."""
    return {"api": True, "nowebui": True, "listen": flags.get("host") not in (None, "127.0.0.1"),
            **{k: v for k, v in flags.items() if k != "api_key"}, "api_auth": None,
            "gradio_auth": None, "pid": os.getpid()}
