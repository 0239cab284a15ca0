"""Lumen on Ray Serve: replicas of the same server behind one endpoint, on one host or a cluster.

Each replica is a Ray actor with one engine, and serves the very app `create_app` builds for
that engine: the same endpoints, errors, limits, step scheduler and `/metrics`. The app needs
the engine, which exists only inside the replica, so the deployment uses Serve's late-bound
ingress: `@serve.ingress()` without an app, and `__serve_build_asgi_app__`, which Serve calls in
the replica after the constructor has built the engine. Serve then runs the app's lifespan as
uvicorn would: the batcher starts and the engine warms up before the replica takes traffic, and
when the replica stops, its ongoing requests finish (graceful_shutdown_timeout_s) and the
lifespan's shutdown drains the batcher. Every response names its replica (X-Lumen-Replica).

`lumen serve --ray` deploys it (serve/cli.py); `serve run lumen.serve.ray_app:app` (or
`serve run lumen.serve.ray_app:build_app model=default replicas=2`) and
`serve deploy serve/serve_config.yaml` do too.
"""
import asyncio
import dataclasses
import os

import torch
from ray import serve

from lumen import engine
from lumen.engine import InvalidInputError
from lumen.engine.lora import lora_arg

from .app import Limits, create_app, model_label

APP_NAME = "lumen"
REPLICA_HEADER = "X-Lumen-Replica"
# build_app's arguments besides Limits' fields (serve run KEY=VALUE, or the YAML's args).
BUILD_ARGS = ("model", "backend", "device", "replicas", "autoscale", "cpus", "threads", "lora",
              "controlnet")


class ReplicaHeaderMiddleware:
    """Adds X-Lumen-Replica: <replica id> to every response."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.app(scope, receive, named)


@serve.deployment(name="LumenDeployment")
@serve.ingress()
class LumenDeployment:
    """One replica: one engine, and serve/app.py's app (with its batcher) over it."""

    def __init__(self, model: str = "default", backend: str = "torch", device: str | None = None,
                 threads: int | None = None, limits: dict | None = None, lora: list | None = None,
                 controlnet: list | None = None):
        if threads is not None:
            torch.set_num_threads(threads)  # a CPU replica's share of the host's cores
        self.limits = Limits(**(limits or {}))
        self.model_name, self.lora = model_label(model), lora
        self.flags = {"backend": backend, "device": device, "ray": True}
        self.engine = engine.build(model, backend=backend, device=device, lora=lora,
                                   controlnet=controlnet or None)
        self.controlnet_names = [model_label(str(c)) for c in controlnet] if controlnet else None

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, model_name=self.model_name, lora=self.lora, flags=self.flags,
                         controlnet_names=self.controlnet_names, **dataclasses.asdict(self.limits))
        app.add_middleware(ReplicaHeaderMiddleware, replica=serve.get_replica_context().replica_tag)
        return app  # Serve's wrapper keeps it as self.app

    async def check_health(self) -> None:
        """Serve's probe: the batcher's thread is alive and runs a tiny op on the engine's device.

        The op waits behind a running batch, so health_check_timeout_s covers a whole batch.
        """
        batcher = getattr(self.app.state, "batcher", None)
        if batcher is None or not batcher.alive:
            raise RuntimeError("the replica's batcher is not running")
        device = self.engine.device
        await asyncio.wrap_future(batcher.call(lambda: torch.ones(1, device=device).add_(1).cpu()))


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (MIN, MAX) replicas, 0 <= MIN <= MAX, MAX >= 1."""
    low, sep, high = str(text).partition(":")
    if sep and low.strip().isdigit() and high.strip().isdigit():
        low, high = int(low), int(high)
        if low <= high and high >= 1:
            return low, high
    raise InvalidInputError(f"autoscale={text!r}; expected MIN:MAX replicas with "
                            "0 <= MIN <= MAX and MAX >= 1, e.g. 1:4")


def deployment_options(limits: Limits, replicas: int = 1, autoscale: tuple[int, int] | None = None,
                       gpus: bool = False, cpus: float = 1.0) -> dict:
    """LumenDeployment.options(...) for these limits: replica count or autoscaling, resources."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise InvalidInputError(f"replicas={replicas!r}; expected an integer >= 1")
    if gpus:
        resources = {"num_gpus": 1}
    elif isinstance(cpus, (int, float)) and not isinstance(cpus, bool) and cpus > 0:
        resources = {"num_cpus": cpus}
    else:
        raise InvalidInputError(f"cpus={cpus!r}; expected CPUs per replica > 0 (e.g. 0.5)")
    options = {
        "ray_actor_options": resources,
        # A replica holds max_queue waiting images and a running batch: past that, Serve routes
        # to another replica or holds the request, before the batcher would answer 429.
        "max_ongoing_requests": limits.max_queue + limits.max_batch,
        # A request may take timeout_s; a health probe waits behind one running batch.
        "graceful_shutdown_timeout_s": limits.timeout_s + 1,
        "health_check_timeout_s": limits.timeout_s,
    }
    if autoscale is None:
        options["num_replicas"] = replicas
    else:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": limits.max_batch}
    return options


def limits_arg(name: str, value):
    """A Limits field from serve run's KEY=VALUE strings (YAML args arrive typed already)."""
    default = getattr(Limits, name)
    if not isinstance(value, str) or isinstance(default, str) or name == "api_key":
        return value  # typed already, or a text field (batching)
    try:
        return float(value) if isinstance(default, float) else int(value)
    except ValueError:
        raise InvalidInputError(f"{name}={value!r}; expected a number") from None


def build_app(args: dict) -> "serve.Application":
    """Serve's application builder: `serve run lumen.serve.ray_app:build_app model=default
    replicas=2`."""
    fields = {f.name for f in dataclasses.fields(Limits)}
    unknown = sorted(set(args) - fields - set(BUILD_ARGS))
    if unknown:
        raise InvalidInputError(f"unknown argument(s) {', '.join(unknown)}; expected some of "
                                f"{', '.join(BUILD_ARGS + tuple(sorted(fields)))}")
    limits = Limits(**{k: limits_arg(k, v) for k, v in args.items() if k in fields})
    device = args.get("device")
    autoscale = parse_autoscale(args["autoscale"]) if args.get("autoscale") else None
    gpus = device != "cpu" and torch.cuda.is_available()
    options = deployment_options(limits, int(args.get("replicas", 1)), autoscale, gpus,
                                 float(args.get("cpus", 1.0)))
    threads = args.get("threads")
    threads = int(threads) if threads is not None else (None if gpus else cpu_threads(options))
    return LumenDeployment.options(**options).bind(
        model=args.get("model", "default"), backend=args.get("backend", "torch"), device=device,
        threads=threads, limits=dataclasses.asdict(limits), lora=lora_args(args.get("lora")),
        controlnet=controlnet_args(args.get("controlnet")))


def controlnet_args(value) -> list | None:
    """serve run's controlnet=FOLDER,... string, or YAML's list of folders."""
    if isinstance(value, str):
        return [part for part in value.split(",") if part] or None
    return value


def lora_args(value):
    """serve run's lora=PATH[:SCALE],... string, or YAML's list of paths / [path, scale]."""
    if isinstance(value, str):
        return [lora_arg(part) for part in value.split(",") if part]
    return value


def cpu_threads(options: dict) -> int:
    """torch threads of a CPU replica: its whole CPUs, at least one."""
    return max(1, int(options["ray_actor_options"]["num_cpus"]))


def env_args() -> dict:
    """build_app's arguments from LUMEN_MODEL, LUMEN_BACKEND, LUMEN_REPLICAS and LUMEN_API_KEY."""
    names = {"LUMEN_MODEL": "model", "LUMEN_BACKEND": "backend", "LUMEN_REPLICAS": "replicas",
             "LUMEN_API_KEY": "api_key"}
    return {arg: os.environ[var] for var, arg in names.items() if os.environ.get(var)}


app = build_app(env_args())  # `serve run lumen.serve.ray_app:app`
