"""`lumen serve`: build one engine, warm it up, serve it over HTTP until SIGTERM."""
import dataclasses
import os
import signal
import threading

from lumen.engine.cli import add_lora_argument


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP server (OpenAI and AUTOMATIC1111 APIs) with dynamic batching")
    p.add_argument("--model", default="default", help="built-in name (default, flawed) or a local diffusers folder")
    p.add_argument("--backend", default="torch", help="torch, onnxruntime or tensorrt")
    p.add_argument("--controlnet", nargs="+", default=None, metavar="FOLDER",
                   help="local ControlNet folders; clients name them by folder name")
    p.add_argument("--device", default=None)
    add_lora_argument(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch", type=int, default=8,
                   help="images in the running batch (each takes 2 UNet rows with CFG)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the oldest request waits for company on an idle server")
    p.add_argument("--batching", default="step", choices=("step", "request"),
                   help="step: requests join and leave the running batch at step boundaries; "
                        "request: whole-request batches of equal settings")
    p.add_argument("--preview-every", type=int, default=0, metavar="N",
                   help="decode a preview for GET /sdapi/v1/progress every N steps (0: off)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting images before 429")
    p.add_argument("--timeout-s", type=float, default=300.0, help="request age that gets 504")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024, help="width x height of one image")
    p.add_argument("--max-images", type=int, default=None, help="images per request (default: --max-batch)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--api-key", default=os.environ.get("LUMEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LUMEN_API_KEY)")
    p.add_argument("--ray", action="store_true",
                   help="serve replicas on Ray Serve: a local Ray, or the cluster at $RAY_ADDRESS")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="with --ray: this many replicas")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="with --ray: autoscale between MIN and MAX replicas")
    p.add_argument("--replica-cpus", type=float, default=1.0,
                   help="with --ray on CPUs: CPUs per replica (with GPUs, each replica takes one GPU)")
    p.set_defaults(func=run_serve)


def limits_from(args) -> dict:
    return dict(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, batching=args.batching,
                preview_every=args.preview_every, max_queue=args.max_queue,
                timeout_s=args.timeout_s, max_pixels=args.max_pixels, max_images=args.max_images,
                max_body_bytes=args.max_body_bytes, api_key=args.api_key)


def start_flags(args) -> dict:
    """What A1111's /sdapi/v1/cmd-flags shows of this server's start-up (never a path or a key)."""
    return {"backend": args.backend, "device": args.device, "host": args.host, "port": args.port,
            "lora": len(args.lora or ())}


def run_serve(args) -> int:
    if args.ray:
        return run_ray(args)
    from lumen.engine.errors import InvalidInputError

    if args.replicas is not None or args.autoscale is not None:
        raise InvalidInputError("--replicas and --autoscale need --ray")
    import uvicorn

    from lumen.engine import build

    from .app import create_app, model_label

    eng = build(args.model, backend=args.backend, device=args.device, lora=args.lora,
                controlnet=args.controlnet)
    names = [model_label(path) for path in args.controlnet] if args.controlnet else None
    app = create_app(eng, model_name=model_label(args.model), lora=args.lora,
                     flags=start_flags(args), controlnet_names=names, **limits_from(args))
    print(f"lumen serve: {model_label(args.model)} on {eng.device}, warming up, then "
          f"http://{args.host}:{args.port}", flush=True)
    # uvicorn drains on SIGTERM (stops accepting, finishes requests, lifespan shutdown drains the
    # batcher), then re-raises the signal under the previous handler: make that a no-op so
    # the process exits 0 after a graceful shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=int(args.timeout_s) + 1)
    return 0


def run_ray(args) -> int:
    """`lumen serve --ray`: deploy on a local Ray (or $RAY_ADDRESS's) until SIGINT or SIGTERM."""
    import ray
    from ray import serve

    from .app import Limits, model_label
    from .ray_app import (APP_NAME, LumenDeployment, cpu_threads, deployment_options,
                          parse_autoscale)

    address = os.environ.get("RAY_ADDRESS") or "local"
    limits = Limits(**limits_from(args))
    autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
    replicas = 1 if args.replicas is None else args.replicas
    deployment_options(limits, replicas, autoscale, False, args.replica_cpus)  # checks, before Ray
    ray.init(address=address)
    try:
        gpus = args.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
        options = deployment_options(limits, replicas, autoscale, gpus, args.replica_cpus)
        threads = None if gpus else cpu_threads(options)
        serve.start(http_options={"host": args.host, "port": args.port})
        deployment = LumenDeployment.options(**options).bind(
            model=args.model, backend=args.backend, device=args.device, threads=threads,
            limits=dataclasses.asdict(limits), lora=args.lora, controlnet=args.controlnet)
        serve.run(deployment, name=APP_NAME, route_prefix="/")  # returns once replicas are up
        scale = f"{autoscale[0]}-{autoscale[1]}" if autoscale else str(replicas)
        print(f"lumen serve --ray: {model_label(args.model)}, {scale} replica(s) "
              f"({'1 GPU' if gpus else f'{args.replica_cpus:g} CPU'} each) on "
              f"http://{args.host}:{args.port}", flush=True)
        wait_for_signal()
        serve.delete(APP_NAME)  # replicas finish their requests, then drain their batchers
        if address == "local":
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
