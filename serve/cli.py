"""`lumen serve`: build one engine, warm it up, serve it over HTTP until SIGTERM."""
import os
import signal
from pathlib import Path

from engine.cli import add_lora_argument


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="HTTP server (OpenAI and AUTOMATIC1111 APIs) with dynamic batching")
    p.add_argument("--model", default="default", help="built-in name (default, flawed) or a local diffusers folder")
    p.add_argument("--backend", default="torch", help="torch, onnxruntime or tensorrt")
    p.add_argument("--device", default=None)
    add_lora_argument(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch", type=int, default=8, help="images per Engine.run")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the oldest waiting request waits for compatible ones")
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
    return dict(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                timeout_s=args.timeout_s, max_pixels=args.max_pixels, max_images=args.max_images,
                max_body_bytes=args.max_body_bytes, api_key=args.api_key)


def model_label(model: str) -> str:
    """The name clients see: a built-in name, or a folder's own name (never its path)."""
    return model if model in ("default", "flawed") else Path(model).name


def run_serve(args) -> int:
    if args.ray:
        from .ray_app import run_ray

        return run_ray(args)
    if args.replicas is not None or args.autoscale is not None:
        from engine import InvalidInputError

        raise InvalidInputError("--replicas and --autoscale need --ray")
    import uvicorn

    import engine

    from .app import create_app

    eng = engine.build(args.model, backend=args.backend, device=args.device, lora=args.lora)
    app = create_app(eng, model_name=model_label(args.model), **limits_from(args))
    print(f"lumen serve: {model_label(args.model)} on {eng.device}, warming up, then "
          f"http://{args.host}:{args.port}", flush=True)
    # uvicorn drains on SIGTERM (stops accepting, finishes requests, lifespan shutdown drains the
    # batcher), then re-raises the signal under the previous handler: make that a no-op so
    # the process exits 0 after a graceful shutdown.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=int(args.timeout_s) + 1)
    return 0
