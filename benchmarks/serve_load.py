"""Serving under load: traffic shapes against the server's batching modes, in one run.

Starts `lumen serve` itself, once per mode, and sends OpenAI image requests:
- modes: `--max-batch 1`, `--batching request` (whole-request batches of equal settings) and
  `--batching step` (the step scheduler: requests join and leave at step boundaries);
- workloads: uniform (every request alike), mixed (steps {20, 25, 30} x guidance {5, 6, 7, 7.5,
  9} x samplers {ddim, euler_ancestral}: closed loop, each client sends back to back) and
  poisson (mixed requests arriving open-loop at 50%, 80% and 95% of the request-batching mode's
  measured mixed capacity: the same offered load for every mode).
It reports images/s, p50 and p99 latency, the mean queue wait (arrival to first step) and the
images per UNet call the server ran (from its /metrics, summed over replicas). With --ray, the
modes are the single-process server and `lumen serve --ray --replicas N` for each N of
--replicas (step batching in all). Writes serve-load.json (serve-load-ray.json with --ray).

    lumen bench serve --workload mixed poisson --clients 16 --out benchmarks/results
    lumen bench serve --ray --replicas 1 2 --clients 16 --out benchmarks/results
"""
import itertools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPTS = ["a red circle on a solid black background", "a white square on a solid white background",
           "a blue triangle on a solid gray background", "a yellow circle on a solid black background"]
MIXED = list(itertools.product((20, 25, 30), (5.0, 6.0, 7.0, 7.5, 9.0), ("ddim", "euler_ancestral")))
LOADS = (0.5, 0.8, 0.95)  # poisson: fractions of the measured capacity
MODES = {"request": ("request", None), "step": ("step", None), "max-batch 1": ("request", 1)}
COLUMNS = (("server", "{}", 8), ("batching", "{}", 11), ("workload", "{}", 11), ("clients", "{}", 7),
           ("requests", "{}", 8), ("images_per_s", "{:.2f}", 12), ("p50_ms", "{:.0f}", 8),
           ("p99_ms", "{:.0f}", 8), ("queue_wait_ms", "{:.0f}", 13), ("per_unet_call", "{:.2f}", 13))


@dataclass(frozen=True)
class Result:
    """One row: a mode, a workload and a client count (poisson: the offered load)."""

    server: str  # "single", or "ray xN" for N replicas
    batching: str  # a MODES name
    workload: str  # uniform, mixed, or "poisson 80%"
    clients: int  # closed-loop clients; 0 for poisson
    requests: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    queue_wait_ms: float  # mean, arrival to first step
    per_unet_call: float  # images per UNet call


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=25, help="the uniform workload's steps")
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--workload", nargs="+", default=["uniform", "mixed"],
                        choices=("uniform", "mixed", "poisson"))
    parser.add_argument("--batching", nargs="+", default=list(MODES), choices=list(MODES),
                        help="the modes to compare (poisson needs 'request' for its capacity)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4,
                        help="requests each client sends (at least 8 in all per row)")
    parser.add_argument("--poisson-requests", type=int, default=48, help="requests per poisson row")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching modes' limit")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--ray", action="store_true",
                        help="compare the single-process server with Ray Serve replicas")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="with --ray: the replica counts to measure")
    parser.add_argument("--out", default=".", help="folder for serve-load.json")


def start_server(model: str, max_batch: int, batch_wait_ms: float, batching: str = "step",
                 replicas: int | None = None) -> tuple[subprocess.Popen, str]:
    """`lumen serve` on a free port, or `lumen serve --ray` with replicas; waits for /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LUMEN_API_KEY", "RAY_ADDRESS")}
    ray = [] if replicas is None else ["--ray", "--replicas", str(replicas), "--replica-cpus",
                                       f"{(os.cpu_count() or 1) / replicas:g}"]
    proc = subprocess.Popen([sys.executable, "-m", "lumen", "serve", "--model", model, "--port",
                             str(port), "--max-batch", str(max_batch), "--batch-wait-ms",
                             str(batch_wait_ms), "--batching", batching, "--max-queue", "1024",
                             *ray], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def wait_healthy(proc, url: str, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lumen serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"lumen serve not healthy within {timeout} s")


def totals(client, replicas: int = 1) -> dict:
    """Sums and counts of the server's batch-size and queue-wait histograms so far.

    Behind Ray Serve each /metrics answers for the replica its X-Lumen-Replica header names,
    and Serve's router sends back-to-back requests to one replica: ask 4 at a time until every
    replica has answered, and sum.
    """
    from concurrent.futures import ThreadPoolExecutor

    per_replica = {}
    with ThreadPoolExecutor(4) as pool:
        for _ in range(25 * replicas):
            for r in pool.map(lambda _: client.get("/metrics"), range(4 if replicas > 1 else 1)):
                per_replica[r.headers.get("x-lumen-replica")] = histogram_totals(r.text)
            if len(per_replica) == replicas:
                return {k: sum(v[k] for v in per_replica.values()) for k in HISTOGRAMS}
    raise RuntimeError(f"only {len(per_replica)} of {replicas} replicas answered /metrics")


HISTOGRAMS = ("lumen_batch_images_sum", "lumen_batch_images_count", "lumen_queue_wait_seconds_sum",
              "lumen_queue_wait_seconds_count")


def histogram_totals(text: str) -> dict:
    """HISTOGRAMS' values in a /metrics answer."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return {k: values[k] for k in HISTOGRAMS}


def request_body(workload: str, steps: int, size: str, c: int, k: int, rng: random.Random) -> dict:
    body = {"prompt": PROMPTS[(c + k) % 4], "size": size, "num_inference_steps": steps,
            "seed": 1000 * c + k}
    if workload != "uniform":
        body["num_inference_steps"], body["guidance_scale"], body["sampler"] = rng.choice(MIXED)
    return body


def closed_loop(url: str, workload: str, clients: int, per_client: int, steps: int,
                size: str) -> tuple[list[float], float]:
    """Each client sends its requests back to back; returns latencies (s) and wall time."""
    import httpx

    latencies, failures = [], []

    def client(c: int) -> None:
        rng = random.Random(c)
        with httpx.Client(base_url=url, timeout=600) as http:
            for k in range(per_client):
                start = time.perf_counter()
                r = http.post("/v1/images/generations",
                              json=request_body(workload, steps, size, c, k, rng))
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    failures.append(r.text)
    return run_threads([threading.Thread(target=client, args=(c,)) for c in range(clients)],
                       latencies, failures)


def open_loop(url: str, rate: float, requests: int, size: str) -> tuple[list[float], float]:
    """Mixed requests at Poisson arrival times of `rate` per second, each on its own thread."""
    import httpx

    latencies, failures = [], []
    rng = random.Random(28)
    gaps = [rng.expovariate(rate) for _ in range(requests)]
    bodies = [request_body("mixed", 0, size, k, k, rng) for k in range(requests)]

    def send(body) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            start = time.perf_counter()
            r = http.post("/v1/images/generations", json=body)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                failures.append(r.text)

    def arrivals() -> None:
        threads = []
        for gap, body in zip(gaps, bodies):
            time.sleep(gap)
            threads.append(threading.Thread(target=send, args=(body,)))
            threads[-1].start()
        for t in threads:
            t.join()
    return run_threads([threading.Thread(target=arrivals)], latencies, failures)


def run_threads(threads, latencies: list[float], failures: list[str]) -> tuple[list[float], float]:
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    return latencies, time.perf_counter() - start


def measure(args, mode: str, replicas: int | None = None, capacity: float | None = None) -> list[Result]:
    """Every workload's rows for one server mode; poisson rows need `capacity` (images/s)."""
    import httpx

    batching, max_batch = MODES[mode]
    proc, url = start_server(args.model, max_batch or args.max_batch, args.batch_wait_ms, batching,
                             replicas)
    server = "single" if replicas is None else f"ray x{replicas}"
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=60) as metrics:
            def row(workload: str, clients: int, run) -> None:
                before = totals(metrics, replicas or 1)
                latencies, wall = run()
                after = totals(metrics, replicas or 1)
                d = {k: after[k] - before[k] for k in HISTOGRAMS}
                q = statistics.quantiles(latencies, n=100, method="inclusive")
                rows.append(Result(
                    server, mode, workload, clients, len(latencies), len(latencies) / wall,
                    statistics.median(latencies) * 1e3, q[98] * 1e3,
                    1e3 * d["lumen_queue_wait_seconds_sum"] / max(d["lumen_queue_wait_seconds_count"], 1),
                    d["lumen_batch_images_sum"] / max(d["lumen_batch_images_count"], 1)))
                print(table(rows[-1:], header=False), flush=True)
            for workload in [w for w in args.workload if w != "poisson"]:
                for clients in args.clients:
                    per_client = max(args.requests_per_client, -(-8 // clients))
                    row(workload, clients, lambda: closed_loop(url, workload, clients, per_client,
                                                               args.steps, args.size))
            if "poisson" in args.workload:
                capacity = capacity if capacity is not None else mixed_capacity(rows)
                for load in LOADS:
                    row(f"poisson {load:.0%}", 0,
                        lambda: open_loop(url, load * capacity, args.poisson_requests, args.size))
    finally:
        proc.terminate()
        proc.wait(120)
    return rows


def table(rows: list[Result], header: bool = True) -> str:
    lines = ["  ".join(f"{name:>{width}}" for name, _, width in COLUMNS)] if header else []
    for r in rows:
        lines.append("  ".join(f"{fmt.format(getattr(r, name)):>{width}}" for name, fmt, width in COLUMNS))
    return "\n".join(lines)


def run(args) -> int:
    import torch

    started = time.perf_counter()
    print(f"lumen bench serve: {args.model}, {args.size}, workloads {args.workload}, modes "
          f"{args.batching}, clients {args.clients}, --max-batch {args.max_batch} --batch-wait-ms "
          f"{args.batch_wait_ms}; {os.cpu_count()} CPUs, CUDA {'yes' if torch.cuda.is_available() else 'no'}",
          flush=True)
    print(table([]), flush=True)
    if args.ray:
        rows = measure(args, "step")
        rows += [row for n in args.replicas for row in measure(args, "step", n)]
    else:
        if "poisson" in args.workload and not {"request", "mixed"} <= {*args.batching, *args.workload}:
            raise SystemExit("--workload poisson needs --batching request and --workload mixed: "
                             "request batching's mixed capacity sets the offered load")
        rows = []
        for mode in sorted(args.batching, key=lambda m: m != "request"):  # request first
            capacity = mixed_capacity(rows) if rows and "poisson" in args.workload else None
            rows += measure(args, mode, capacity=capacity)
    print(table(rows))
    print_ratios(args, rows)
    path = Path(args.out) / ("serve-load-ray.json" if args.ray else "serve-load.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = {k: getattr(args, k) for k in ("model", "steps", "size", "workload", "batching", "clients",
                                           "requests_per_client", "poisson_requests", "max_batch",
                                           "batch_wait_ms", "ray", "replicas")}
    facts.update(cpus=os.cpu_count(), cuda=torch.cuda.is_available(), wall_s=time.perf_counter() - started)
    path.write_text(json.dumps({"run": facts, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {path}")
    return 0


def mixed_capacity(rows: list[Result]) -> float:
    """Images/s of request batching on mixed traffic at the most clients (measured first)."""
    mixed = [r for r in rows if r.batching == "request" and r.workload == "mixed"]
    return max(mixed, key=lambda r: r.clients).images_per_s


def print_ratios(args, rows: list[Result]) -> None:
    by = {(r.server, r.batching, r.workload, r.clients): r for r in rows}
    for (server, mode, workload, clients), r in by.items():
        if args.ray and server != "single":
            base = by[("single", "step", workload, clients)]
            print(f"{workload}, {clients} clients: {server} gives {r.images_per_s / base.images_per_s:.2f}x "
                  "the single server's images/s")
        elif mode == "step" and ("single", "request", workload, clients) in by:
            base = by[("single", "request", workload, clients)]
            print(f"{workload}, {clients or 'open-loop'} clients: step batching gives "
                  f"{r.images_per_s / base.images_per_s:.2f}x request batching's images/s, "
                  f"p99 {r.p99_ms / base.p99_ms:.2f}x, {r.per_unet_call:.2f} images per UNet call")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lumen.benchmarks.serve_load", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
