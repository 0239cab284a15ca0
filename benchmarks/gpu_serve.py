"""The GPU check's serve stage: the step scheduler's per-step graphs and its throughput.

1. Per-step graphs against the whole-loop graph at batch 1: one request (SD1.5's UNet, random
   weights, CFG, the sd15 row's size and steps) through `Engine.sample` replaying the captured
   loop, and through the step scheduler (one step graph replayed per step, sampler updates
   eager), prepared inputs in, final latents out. Target: at most 2% slower.
2. The scheduler's images/s with 1, 4 and 8 closed-loop clients (each submits its next request
   when the last one is answered), and the images per UNet call it ran.
Same contract as gpu_stages.py: `serve(sizes, out) -> {"headline", "figures", "checks"}`.
"""
import statistics
import threading
import time
from pathlib import Path

import torch

from .gpu_stages import check

STEP_GRAPH_SLOWDOWN = 1.02  # per-step graphs / whole-loop graph, at most (batch 1)
CLIENTS = (1, 4, 8)


def serve(sizes, out: Path) -> dict:
    from lumen import engine
    from lumen.serve.batcher import Batcher

    from .presets import PRESETS

    settings = sizes.sd15
    device, dtype = torch.device(sizes.device), getattr(torch, sizes.soak_dtype)
    unet = PRESETS[settings.model].build(device, dtype)
    eng = engine.build(unet, device=device, dtype=dtype, cuda_graph="auto")
    side = settings.height // 8  # latent side: the presets have no VAE
    dim = unet.config.cross_attention_dim

    def request(i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return eng.prepare(prompt_embeds=torch.randn(1, 77, dim, generator=g),
                           negative_prompt_embeds=torch.randn(1, 77, dim, generator=g),
                           num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                           generator=torch.Generator().manual_seed(1000 + i), height=side, width=side)

    reps = max(1, sizes.serve_reps)
    loop_ms = timed(lambda: eng.sample(**request(0)), device, reps)
    batcher = Batcher(eng, max_batch=max(CLIENTS), batch_wait_ms=0, output_type="latent")
    try:
        step_ms = timed(lambda: submit(batcher, request(0)), device, reps)
        rates = {n: throughput(batcher, request, n, sizes.serve_jobs) for n in CLIENTS}
    finally:
        batcher.stop()
    ratio = step_ms / loop_ms
    graphs = batcher.step_graphs
    figures = dict(model=settings.model, latent=side, steps=settings.steps, dtype=sizes.soak_dtype,
                   whole_loop_ms=loop_ms, step_graphs_ms=step_ms, ratio=ratio,
                   images_per_s={str(n): r[0] for n, r in rates.items()},
                   images_per_unet_call={str(n): r[1] for n, r in rates.items()},
                   cuda_graph=eng.cuda_graph,
                   step_graph_captures=graphs.captures if graphs else 0,
                   step_graph_replays=graphs.replays if graphs else 0)
    checks = [check("every request answered", all(r[0] > 0 for r in rates.values()),
                    ", ".join(f"{n} clients {r[0]:.2f} images/s" for n, r in rates.items()))]
    if eng.cuda_graph:
        checks.append(check(f"per-step graphs within {STEP_GRAPH_SLOWDOWN - 1:.0%} of the "
                            "whole-loop graph", ratio <= STEP_GRAPH_SLOWDOWN,
                            f"{step_ms:.1f} vs {loop_ms:.1f} ms per image ({ratio:.3f}x)"))
    headline = (f"batch 1: step graphs {step_ms:.1f} ms vs whole loop {loop_ms:.1f} ms "
                f"({ratio:.3f}x); " + ", ".join(f"{n} clients {r[0]:.2f} img/s ({r[1]:.1f}/call)"
                                               for n, r in rates.items()))
    return dict(headline=headline, figures=figures, checks=checks)


def submit(batcher, prepared: dict) -> torch.Tensor:
    """One request through the scheduler, its inputs already prepared; its final latents."""
    from lumen.serve.jobs import Job

    return batcher.submit(Job.prepared(prepared)).result(600)


def timed(fn, device: torch.device, reps: int) -> float:
    """Median wall milliseconds of fn() (synchronised) over reps calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def throughput(batcher, request, clients: int, jobs: int) -> tuple[float, float]:
    """(images/s, images per UNet call) with `clients` closed-loop clients of `jobs` requests."""
    calls, images = batcher.batches, batcher.images
    prepared = [[request(100 * c + k) for k in range(jobs)] for c in range(clients)]

    def client(c: int) -> None:
        for r in prepared[c]:
            submit(batcher, r)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return clients * jobs / wall, (batcher.images - images) / max(batcher.batches - calls, 1)
