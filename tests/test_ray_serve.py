"""Lumen on a real local Ray Serve: two replicas behind one endpoint, a replica killed mid-load."""
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
import torch
import yaml

try:
    import ray
    from ray import serve
except ImportError:
    pytest.skip("ray[serve] is not installed (pip install -e '.[ray]')", allow_module_level=True)

from lumen import engine
from lumen.engine import InvalidInputError
from lumen.serve.app import Limits
from lumen.serve.ray_app import (APP_NAME, REPLICA_HEADER, LumenDeployment, build_app,
                           deployment_options, parse_autoscale)

from server_helpers import RunningServer
from test_serve import BAD, PROMPTS, pixels, post

# max_batch=1: every request runs alone, on a replica as on the single server, so the images
# are equal bit for bit (batch composition, which moves fp32 rounding, cannot differ).
LIMITS = dict(max_batch=1, batch_wait_ms=0, max_queue=16, max_pixels=64 * 64)
REPLICAS = 2
DEADLINE_S = 120  # every wait below is bounded by this
REPO = Path(__file__).resolve().parents[1]


def body(seed: int) -> dict:
    return {"prompt": PROMPTS[seed % 4], "size": "32x32", "seed": seed, "num_inference_steps": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lumen_serve_ray_deploys_serves_and_exits_0_on_sigterm():
    # First in this file: it runs its own local Ray before the module's Ray starts.
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lumen", "serve", "--ray", "--replicas", "1", "--replica-cpus",
         "1", "--port", str(port), "--max-batch", "1"], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready = wait_for_line(proc, "lumen serve --ray:")
        assert "1 replica(s) (1 CPU each)" in ready and f"http://127.0.0.1:{port}" in ready
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            r = post(c, "openai", body(7))
        assert r.status_code == 200 and r.headers[REPLICA_HEADER], r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def wait_for_line(proc: subprocess.Popen, start: str) -> str:
    """The first stdout line that starts with start, within DEADLINE_S (a reader thread)."""
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if line.startswith(start):
                found.append(line)
                return
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(DEADLINE_S)
    assert found, f"no {start!r} line within {DEADLINE_S} s (exit code {proc.poll()})"
    return found[0]


def test_the_serve_config_yaml_is_a_valid_serve_config_for_build_app():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "serve" / "serve_config.yaml").read_text())
    (application,) = ServeDeploySchema.model_validate(config).applications
    assert application.import_path == "lumen.serve.ray_app:build_app"
    deployment = build_app(application.args)._bound_deployment
    assert deployment.name == application.deployments[0].name == "LumenDeployment"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4


@pytest.fixture(scope="module")
def single():
    """The single-process server, computing with one torch thread like each replica."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    srv = RunningServer(engine.build("default", controlnet="default"), controlnet_names=["default"],
                        **LIMITS)
    yield srv
    srv.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def url():
    """Two replicas (half a CPU and one torch thread each) behind Serve's proxy on 127.0.0.1."""
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = deployment_options(Limits(**LIMITS), replicas=REPLICAS, cpus=0.5)
        serve.run(LumenDeployment.options(**options).bind(model="default", threads=1, limits=LIMITS,
                                                          controlnet=["default"]),
                  name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def reference(single, seeds) -> dict[int, np.ndarray]:
    with single.client() as c:
        return {s: pixels(post(c, "openai", body(s)).json()["data"][0]["b64_json"]) for s in seeds}


def generate(client, seed: int) -> tuple[np.ndarray, str]:
    r = post(client, "openai", body(seed))
    assert r.status_code == 200, r.text
    return pixels(r.json()["data"][0]["b64_json"]), r.headers[REPLICA_HEADER]


def test_two_replicas_share_concurrent_requests_and_give_the_single_servers_images(single, client):
    seeds = range(100, 112)
    want = reference(single, seeds)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = dict(zip(seeds, pool.map(lambda s: generate(client, s), seeds, timeout=DEADLINE_S)))
    assert len({replica for _, replica in got.values()}) == REPLICAS
    for seed in seeds:
        assert np.array_equal(got[seed][0], want[seed]), seed
    metrics = client.get("/metrics")  # one replica's own registry, named by the header
    assert 'lumen_requests_total{endpoint="/v1/images/generations",status="200"}' in metrics.text
    assert metrics.headers[REPLICA_HEADER] in {replica for _, replica in got.values()}


def test_img2img_on_the_replicas_gives_the_single_servers_image(single, client):
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (32, 32), (255, 255, 255)).save(buffer, format="PNG")
    body = {"prompt": PROMPTS[0], "width": 32, "height": 32, "steps": 4, "seed": 9,
            "denoising_strength": 0.5, "init_images": [base64.b64encode(buffer.getvalue()).decode()]}
    with single.client() as c:
        want = c.post("/sdapi/v1/img2img", json=body)
    got = client.post("/sdapi/v1/img2img", json=body)
    assert want.status_code == got.status_code == 200, got.text
    assert np.array_equal(pixels(got.json()["images"][0]), pixels(want.json()["images"][0]))
    assert got.headers[REPLICA_HEADER]


def test_a_controlnet_unit_on_the_replicas_gives_the_single_servers_image(single, client):
    """Each replica loads the built-in ControlNet; an A1111 ControlNet unit naming it draws the
    single server's image."""
    mask = PIL.Image.new("RGB", (32, 32))
    PIL.ImageDraw.Draw(mask).ellipse((4, 6, 16, 18), fill=(255, 255, 255))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    unit = {"image": base64.b64encode(buffer.getvalue()).decode(), "model": "default",
            "module": "none", "weight": 1.0}
    body = {"prompt": PROMPTS[0], "width": 32, "height": 32, "steps": 4, "seed": 5,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    assert client.get("/controlnet/model_list").json()["model_list"][0].startswith("default [")
    with single.client() as c:
        want = c.post("/sdapi/v1/txt2img", json=body)
    got = client.post("/sdapi/v1/txt2img", json=body)
    assert want.status_code == got.status_code == 200, got.text
    assert np.array_equal(pixels(got.json()["images"][0]), pixels(want.json()["images"][0]))
    assert 'ControlNet 0: "Model: default' in json.loads(got.json()["info"])["infotexts"][0]


def test_bad_input_gets_the_single_servers_4xx(single, client):
    cases = [case for case in BAD if case[2] in (None, "prompt", "n", "size", "num_inference_steps",
                                                 "sampler", "model", "enable_hr", "width x height")]
    cases.append(("openai", b" " * (2 << 20), None))  # 413: the body limit holds behind Serve
    assert len(cases) >= 10
    with single.client() as direct:
        for endpoint, payload, field in cases:
            want, got = post(direct, endpoint, payload), post(client, endpoint, payload)
            assert 400 <= want.status_code < 500 and got.status_code == want.status_code, payload
            if field is not None:
                assert got.json()["error"]["param"] == want.json()["error"]["param"] == field
    assert client.get("/no/such/path").status_code == direct_status(single, "/no/such/path")


def direct_status(single, path: str) -> int:
    with single.client() as c:
        return c.get(path).status_code


class RetryingClient:
    """Posts a request until it succeeds: same seed, same image, so a retry is idempotent."""

    def __init__(self, client, attempts: int = 20):
        self.client, self.attempts = client, attempts
        self.failed = 0  # attempts that failed (replica down), each retried
        self._lock = threading.Lock()

    def generate(self, seed: int) -> tuple[np.ndarray, str]:
        for _ in range(self.attempts):
            try:
                r = post(self.client, "openai", body(seed))
                if r.status_code == 200:
                    return pixels(r.json()["data"][0]["b64_json"]), r.headers[REPLICA_HEADER]
                assert r.status_code >= 500, r.text  # never a 4xx for a good request
            except httpx.TransportError:
                pass
            with self._lock:
                self.failed += 1
            time.sleep(0.5)
        raise AssertionError(f"seed {seed} failed {self.attempts} times")


def replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def running_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["LumenDeployment"]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_replica_killed_mid_load_is_replaced_and_retries_lose_no_request(single, client):
    seeds = list(range(200, 224))
    want = reference(single, seeds)
    retrying = RetryingClient(client)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(retrying.generate, s) for s in seeds]
        first = next(concurrent.futures.as_completed(futures, timeout=DEADLINE_S))
        victim = first.result()[1]
        ray.kill(replica_actor(victim), no_restart=True)
        got = dict(zip(seeds, (f.result(timeout=DEADLINE_S) for f in futures)))
    print(f"\nreplica {victim} killed mid-load: {retrying.failed} request attempts failed "
          f"while it was down, each retried; {len(seeds)}/{len(seeds)} requests succeeded")
    for seed in seeds:
        assert np.array_equal(got[seed][0], want[seed]), seed
    recovered = replicas_after_recovery(retrying)
    assert victim not in recovered and len(recovered) == REPLICAS


def replicas_after_recovery(retrying: RetryingClient) -> set[str]:
    """The replicas serving once Serve runs REPLICAS again (the new one included)."""
    deadline = time.monotonic() + DEADLINE_S
    while running_replicas() < REPLICAS:
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)
    seen: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(seen) < REPLICAS:  # the router learns of the new replica within seconds
            assert time.monotonic() < deadline, f"only {seen} served after recovery"
            seen |= {replica for _, replica in pool.map(retrying.generate, range(300, 304))}
    return seen


def test_autoscale_bounds_are_checked():
    assert parse_autoscale("1:4") == (1, 4) and parse_autoscale("0:2") == (0, 2)
    for bad in ("3:1", "4", "a:b", "0:0", "-1:2"):
        with pytest.raises(InvalidInputError, match=f"autoscale={bad!r}; expected MIN:MAX"):
            parse_autoscale(bad)


def test_deployment_options_follow_the_limits():
    limits = Limits(max_batch=4, max_queue=32, timeout_s=60)
    options = deployment_options(limits, autoscale=(1, 3), gpus=True)
    assert options["max_ongoing_requests"] == 36 and options["ray_actor_options"] == {"num_gpus": 1}
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                             "target_ongoing_requests": 4}
    assert deployment_options(limits, replicas=2, cpus=0.5)["ray_actor_options"] == {"num_cpus": 0.5}
    with pytest.raises(InvalidInputError, match="replicas=0; expected an integer >= 1"):
        deployment_options(limits, replicas=0)
    with pytest.raises(InvalidInputError, match="cpus=0; expected CPUs per replica > 0"):
        deployment_options(limits, cpus=0)


def test_build_app_reads_serve_run_arguments():
    app = build_app({"model": "default", "replicas": "2", "max_batch": "4", "max_queue": "8"})
    deployment = app._bound_deployment  # Serve's Application has no public accessor
    assert (deployment.num_replicas, deployment.max_ongoing_requests) == (2, 12)
    with pytest.raises(InvalidInputError, match="unknown argument.*replica_count"):
        build_app({"replica_count": 2})
    with pytest.raises(InvalidInputError, match="max_batch='many'; expected a number"):
        build_app({"max_batch": "many"})
    limits = build_app({"batching": "request", "preview_every": "2"})._bound_deployment.init_kwargs["limits"]
    assert (limits["batching"], limits["preview_every"]) == ("request", 2)
    with pytest.raises(InvalidInputError, match="batching='whole'; expected one of step, request"):
        build_app({"batching": "whole"})


def test_build_app_passes_controlnets_to_each_replica():
    kwargs = build_app({"model": "default", "controlnet": "default,/models/edges"})._bound_deployment.init_kwargs
    assert kwargs["controlnet"] == ["default", "/models/edges"]
    assert build_app({"model": "default"})._bound_deployment.init_kwargs["controlnet"] is None


@pytest.mark.parametrize("lora, expected", [
    ("a.safetensors:0.5,b.safetensors", [("a.safetensors", 0.5), ("b.safetensors", 1.0)]),  # serve run
    ([["a.safetensors", 0.5], "b.safetensors"], [["a.safetensors", 0.5], "b.safetensors"]),  # YAML
])
def test_build_app_passes_loras_to_each_replica(lora, expected):
    assert build_app({"model": "default", "lora": lora})._bound_deployment.init_kwargs["lora"] == expected


def test_lumen_serve_rejects_bad_scaling_before_starting_ray(capsys):
    from lumen.cli import main

    assert main(["serve", "--replicas", "2"]) == 2
    assert "--replicas and --autoscale need --ray" in capsys.readouterr().err
    assert main(["serve", "--ray", "--autoscale", "3:1"]) == 2
    assert "autoscale='3:1'; expected MIN:MAX" in capsys.readouterr().err
    assert main(["serve", "--ray", "--replicas", "0"]) == 2
    assert "replicas=0; expected an integer >= 1" in capsys.readouterr().err
