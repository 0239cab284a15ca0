"""Serving under load: 1, 4 and 16 concurrent clients, dynamic batching on vs off, in one run.

Starts `lumen serve` itself (a subprocess per mode: --max-batch N for "on", 1 for "off"), lets
each client send OpenAI image requests back to back, and reports images/s, p50 and p99 request
latency and the mean batch size the server ran (from its /metrics, summed over replicas).
With --ray, the modes are the single-process server and `lumen serve --ray --replicas N` for
each N of --replicas (batching on in all; each replica gets an equal share of the CPUs on a
CPU host). Writes serve-load.json (serve-load-ray.json with --ray).

    lumen bench serve --steps 25 --out benchmarks/results
    lumen bench serve --ray --replicas 1 2 --clients 16 --out benchmarks/results
"""
import json
import os
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
COLUMNS = (("server", "{}", 8), ("batching", "{}", 8), ("clients", "{}", 7), ("requests", "{}", 8), ("images_per_s", "{:.2f}", 12),
           ("p50_ms", "{:.0f}", 8), ("p99_ms", "{:.0f}", 8), ("mean_batch", "{:.2f}", 10))


@dataclass(frozen=True)
class Result:
    """One row: a mode and a client count."""

    server: str  # "single", or "ray xN" for N replicas
    batching: str
    clients: int
    requests: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=4,
                        help="requests each client sends (at least 8 in all per row)")
    parser.add_argument("--max-batch", type=int, default=8, help="the 'on' mode's batch limit")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--ray", action="store_true",
                        help="compare the single-process server with Ray Serve replicas")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="with --ray: the replica counts to measure")
    parser.add_argument("--out", default=".", help="folder for serve-load.json")


def start_server(model: str, max_batch: int, batch_wait_ms: float,
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
                             str(batch_wait_ms), "--max-queue", "1024", *ray],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def batch_totals(client, replicas: int = 1) -> tuple[float, float]:
    """(images, batches) the server has run so far, from its prometheus histogram.

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
                return tuple(sum(v[i] for v in per_replica.values()) for i in (0, 1))
    raise RuntimeError(f"only {len(per_replica)} of {replicas} replicas answered /metrics")


def histogram_totals(text: str) -> tuple[float, float]:
    """(sum, count) of the lumen_batch_images histogram in a /metrics answer."""
    from prometheus_client.parser import text_string_to_metric_families

    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "lumen_batch_images"]
    values = {s.name: s.value for s in family.samples}
    return values["lumen_batch_images_sum"], values["lumen_batch_images_count"]


def load(url: str, clients: int, per_client: int, steps: int, size: str) -> tuple[list[float], float]:
    """Each client sends its requests back to back; returns latencies (s) and wall time."""
    import httpx

    latencies, failures = [], []

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for k in range(per_client):
                body = {"prompt": PROMPTS[(c + k) % 4], "size": size, "num_inference_steps": steps,
                        "seed": 1000 * c + k}
                start = time.perf_counter()
                r = http.post("/v1/images/generations", json=body)
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    failures.append(r.text)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[0]}")
    return latencies, time.perf_counter() - start


def measure(args, mode: str, max_batch: int, replicas: int | None = None) -> list[Result]:
    import httpx

    proc, url = start_server(args.model, max_batch, args.batch_wait_ms, replicas)
    server = "single" if replicas is None else f"ray x{replicas}"
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=60) as metrics:
            for clients in args.clients:
                per_client = max(args.requests_per_client, -(-8 // clients))
                images0, batches0 = batch_totals(metrics, replicas or 1)
                latencies, wall = load(url, clients, per_client, args.steps, args.size)
                images1, batches1 = batch_totals(metrics, replicas or 1)
                q = statistics.quantiles(latencies, n=100, method="inclusive")
                rows.append(Result(server, mode, clients, len(latencies), len(latencies) / wall,
                                   statistics.median(latencies) * 1e3, q[98] * 1e3,
                                   (images1 - images0) / (batches1 - batches0)))
                print(table(rows[-1:], header=False), flush=True)
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
    print(f"lumen bench serve: {args.model}, {args.size}, {args.steps} steps, clients {args.clients}, "
          f"on = --max-batch {args.max_batch} --batch-wait-ms {args.batch_wait_ms}, off = --max-batch 1; "
          f"{os.cpu_count()} CPUs, CUDA {'yes' if torch.cuda.is_available() else 'no'}", flush=True)
    print(table([]), flush=True)
    if args.ray:
        rows = measure(args, "on", args.max_batch)
        rows += [row for n in args.replicas for row in measure(args, "on", args.max_batch, n)]
    else:
        rows = measure(args, "on", args.max_batch) + measure(args, "off", 1)
    print(table(rows))
    print_ratios(args, rows)
    path = Path(args.out) / ("serve-load-ray.json" if args.ray else "serve-load.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    facts = {k: getattr(args, k) for k in ("model", "steps", "size", "clients", "requests_per_client",
                                           "max_batch", "batch_wait_ms", "ray", "replicas")}
    facts.update(cpus=os.cpu_count(), cuda=torch.cuda.is_available(), wall_s=time.perf_counter() - started)
    path.write_text(json.dumps({"run": facts, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"wrote {path}")
    return 0


def print_ratios(args, rows: list[Result]) -> None:
    for clients in args.clients:
        row = {(r.server, r.batching): r for r in rows if r.clients == clients}
        base = row[("single", "on")]
        if args.ray:
            for n in args.replicas:
                ray = row[(f"ray x{n}", "on")]
                print(f"{clients} clients: {n} Ray replica(s) give {ray.images_per_s / base.images_per_s:.2f}x "
                      f"the single server's images/s")
        else:
            off = row[("single", "off")]
            print(f"{clients} clients: batching gives {base.images_per_s / off.images_per_s:.2f}x images/s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lumen.benchmarks.serve_load", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
