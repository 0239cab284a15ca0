"""The batcher and the server's admission: batch composition never changes an image; queue,
timeout, disconnect, model failure and SIGTERM behave as documented."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from lumen import engine
from lumen.serve.batcher import Batcher
from lumen.serve.jobs import BatchKey, Job, ModelError

from server_helpers import RunningServer

PROMPTS = ["a red circle on a solid black background", "a white square on a solid white background",
           "a blue triangle on a solid gray background", "a green square on a solid black background"]
NEGATIVES = ["", "white", "black background", "red"]
BODY = {"prompt": PROMPTS[0], "size": "32x32", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def eng():
    return engine.build("default")


def key_for(eng, sampler="euler_ancestral", eta=0.7):
    return BatchKey(32, 32, 3, eng.config.replace(sampler=sampler), 7.5, 0.7, eta)


def job(key, i, n):
    """Job i with n images: mixed prompts, negative prompts and seeds."""
    return Job(key, tuple(PROMPTS[(i + k) % 4] for k in range(n)),
               tuple(NEGATIVES[(i + 2 * k) % 4] for k in range(n)), tuple(1000 * i + k for k in range(n)))


def alone(eng, j: Job):
    """The job's images from Engine.run alone, as float tensors."""
    key = j.key
    return eng.with_config(key.config).run(
        prompt=list(j.prompts), negative_prompt=list(j.negative_prompts) if key.cfg else None,
        generator=j.generators(), num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
        guidance_rescale=key.guidance_rescale, eta=key.eta, height=key.height, width=key.width,
        output_type="pt").images


def assert_alone(eng, results) -> None:
    """Same seeds, same noise: equal to fp32 rounding, not bit for bit.

    MKL's sgemm and oneDNN's convolutions pick their kernels by matrix size, and rows are images:
    one linear layer of the UNet gives a row ~1e-6 apart at 1, 2, 3 or 6 rows than at 16
    (measured; MKL_CBWR does not change it). Through up to 7 steps of the built-in model that
    grows to at most 1.5e-5 in [0, 1] image values (measured over these tests), so the bound is
    2e-5 here, where runs of 3 steps stay within 1e-5. 8-bit PNGs over HTTP differ by at most one
    level. Images are compared as float tensors.
    """
    for j, images in results:
        assert images.shape == (j.n, 3, j.key.height, j.key.width)
        torch.testing.assert_close(images, alone(eng, j), rtol=0, atol=ATOL)


ATOL = 2e-5  # see assert_alone
MIXED = [  # (sampler, eta, steps, guidance): every sampler, CFG on and off, 1 to 2 UNet calls a step
    ("ddim", 0.0, 6, 7.5), ("heun", 0.0, 3, 1.0), ("dpmpp_2m", 0.0, 4, 5.0),
    ("euler_ancestral", 0.7, 7, 9.0), ("euler", 0.0, 2, 6.0), ("ddim", 1.0, 5, 1.0)]


def mixed_key(eng, i):
    sampler, eta, steps, w = MIXED[i % len(MIXED)]
    return BatchKey(32, 32, steps, eng.config.replace(sampler=sampler), w, 0.25 * (i % 4), eta)


def test_requests_that_join_mid_run_and_leave_early_get_the_images_they_get_alone(eng):
    """Steps, sampler, guidance, rescale, eta and CFG differ; one UNet call a tick serves them all."""
    sizes = []
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=0, on_batch=lambda n, s: sizes.append(n),
                      output_type="pt")
    try:
        first = job(mixed_key(eng, 0), 0, 1)
        futures = [batcher.submit(first)]
        wait_until(lambda: batcher.progress()[0].step >= 2)  # it runs: the others join mid-run
        jobs = [first] + [job(mixed_key(eng, i), i, 1 + i % 2) for i in range(1, len(MIXED))]
        futures += [batcher.submit(j) for j in jobs[1:]]
        results = [(j, f.result(timeout=120)) for j, f in zip(jobs, futures)]
    finally:
        batcher.stop()
    assert_alone(eng, results)
    assert sizes[:2] == [1, 1] and max(sizes) == 8  # alone, then all 8 slots in one call
    assert sizes[-1] < 8  # the short requests left before the long ones ended
    assert first.joined == 0 and jobs[1].joined >= 2  # joined a running batch


def test_the_oldest_request_joins_first_and_nothing_overtakes_it(eng):
    """max_batch 4: a 3-image request waits for room; a 1-image request behind it waits too."""
    batcher = Batcher(eng, max_batch=4, batch_wait_ms=0, output_type="pt")
    try:
        jobs = [job(mixed_key(eng, 0), 0, 2), job(mixed_key(eng, 3), 1, 2), job(mixed_key(eng, 4), 2, 3),
                job(mixed_key(eng, 4), 3, 1)]
        futures = [batcher.submit(j) for j in jobs]
        results = [(j, f.result(timeout=120)) for j, f in zip(jobs, futures)]
    finally:
        batcher.stop()
    assert_alone(eng, results)
    joined = [j.joined for j in jobs]
    assert joined[0] == joined[1] == 0 and joined[1] < joined[2] <= joined[3]  # arrival order


def test_request_batching_joins_only_an_empty_batch_with_an_equal_key(eng):
    sizes = []
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=1000, on_batch=lambda n, s: sizes.append(n),
                      output_type="pt", policy="request")
    try:
        a, b = mixed_key(eng, 0), mixed_key(eng, 2)  # 6 and 4 steps
        jobs = [job(a, 0, 2), job(b, 1, 1), job(a, 2, 1), job(b, 3, 2)]
        futures = [batcher.submit(j) for j in jobs]
        results = [(j, f.result(timeout=120)) for j, f in zip(jobs, futures)]
    finally:
        batcher.stop()
    assert_alone(eng, results)
    assert sizes == [3] * 6 + [3] * 4  # key a's 3 images for 6 steps, then key b's for 4
    assert jobs[0].joined == jobs[2].joined == 0 and jobs[1].joined == jobs[3].joined == 6


def test_a_bad_request_fails_alone_when_it_joins(eng):
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=500, output_type="pt")
    try:
        a = mixed_key(eng, 3)
        bad = Job(a, ("a cat",), ("",), (1,))
        jobs = [job(a, 0, 2), bad, job(mixed_key(eng, 1), 2, 1)]
        futures = [batcher.submit(j) for j in jobs]
        with pytest.raises(engine.InvalidInputError, match="unknown word 'cat'"):
            futures[1].result(timeout=120)
        assert_alone(eng, [(j, futures[i].result(timeout=120)) for i, j in enumerate(jobs) if i != 1])
    finally:
        batcher.stop()


def test_queue_past_max_queue_gets_429_with_retry_after(eng):
    srv = RunningServer(eng, batch_wait_ms=0, max_queue=1, max_batch=1)
    try:
        with srv.client() as c:
            answers = {}

            def post(name, steps):
                answers[name] = c.post("/v1/images/generations", json={**BODY, "num_inference_steps": steps})
            threads = [threading.Thread(target=post, args=("running", 60))]
            threads[0].start()
            wait_until(lambda: srv.batcher.running_images == 1)
            threads.append(threading.Thread(target=post, args=("waiting", 2)))
            threads[1].start()
            wait_until(lambda: srv.batcher.waiting_images == 1)  # no room in the running batch
            r = c.post("/v1/images/generations", json=BODY)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            for thread in threads:
                thread.join(60)
            assert answers["running"].status_code == answers["waiting"].status_code == 200
            assert c.post("/v1/images/generations", json=BODY).status_code == 200
    finally:
        srv.stop()


def test_request_older_than_timeout_gets_504(eng):
    srv = RunningServer(eng, batch_wait_ms=600, timeout_s=0.2)
    try:
        with srv.client() as c:
            r = c.post("/v1/images/generations", json=BODY)
            assert r.status_code == 504 and "timeout_s=0.2" in r.json()["error"]["message"]
        assert srv.batcher.batches == 0
    finally:
        srv.stop()


def test_client_that_leaves_before_its_batch_is_dropped_from_it(eng):
    srv = RunningServer(eng, batch_wait_ms=2500)
    try:
        with srv.client(timeout=0.3) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/v1/images/generations", json={**BODY, "n": 3})
        wait_until(lambda: srv.batcher.waiting_images == 0)  # dropped while its batch was waiting
        with srv.client() as c:
            assert c.post("/v1/images/generations", json=BODY).status_code == 200
        assert srv.batcher.batches == 2 and srv.batcher.images == 2  # 2 steps of 1 image
    finally:
        srv.stop()


def test_client_that_leaves_mid_run_frees_its_slots_at_the_next_step(eng):
    srv = RunningServer(eng, batch_wait_ms=0)
    try:
        with srv.client(timeout=0.3) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/v1/images/generations", json={**BODY, "n": 3, "num_inference_steps": 400})
        wait_until(lambda: srv.batcher.running_images == 0, timeout=10)
        steps = srv.batcher.ticks
        assert 0 < steps < 400  # left while running
        with srv.client() as c:
            r = c.post("/v1/images/generations", json=BODY)
            assert r.status_code == 200 and srv.batcher.ticks == steps + 2
    finally:
        srv.stop()


class FailingRunner:
    """The real UNet runner, made to raise out-of-memory on request."""

    def __init__(self, runner):
        self.runner, self.fail = runner, False

    def __call__(self, *args, **kwargs):
        if self.fail:
            self.fail = False
            raise torch.OutOfMemoryError("out of memory (tried to allocate 4.00 GiB)")
        return self.runner(*args, **kwargs)


def test_model_failure_is_503_with_the_reason_and_the_next_request_is_served(eng):
    runner = FailingRunner(eng.runner)
    failing = engine.Engine(eng.components, eng.config, runner, eng.device, eng.dtype)
    srv = RunningServer(failing, batch_wait_ms=0)
    try:
        with srv.client() as c:
            runner.fail = True
            r = c.post("/v1/images/generations", json=BODY)
            assert r.status_code == 503 and "OutOfMemoryError" in r.json()["error"]["message"]
            assert c.post("/v1/images/generations", json=BODY).status_code == 200
            assert 'lumen_errors_total{kind="model"} 1.0' in c.get("/metrics").text
    finally:
        srv.stop()


def test_sigterm_finishes_the_running_request_and_exits_0():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LUMEN_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "lumen", "serve", "--port", str(port),
                             "--batch-wait-ms", "1000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), timeout=120)
        result = {}
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": "Bearer k"}) as c:
            thread = threading.Thread(target=lambda: result.update(
                r=c.post("/v1/images/generations", json={**BODY, "num_inference_steps": 10})))
            thread.start()
            wait_until(lambda: "lumen_queue_images 1.0" in c.get("/metrics").text)  # in its batch wait
            proc.send_signal(signal.SIGTERM)
            thread.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 1
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        output = proc.stdout.read()
    assert "lumen serve: default" in output


def healthy(url) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition, timeout=30.0, step=0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


class PoisonRunner:
    """The real runner, with NaN in the output rows of one prompt's text embedding."""

    def __init__(self, eng, prompt):
        self.runner, self.per_row_timesteps = eng.runner, True
        self.poison = eng.prepare(prompt=prompt, guidance_scale=1.0)["emb"][0]

    def __call__(self, x, t, emb, **added):
        m = self.runner(x, t, emb, **added)
        bad = (emb == self.poison).flatten(1).all(1)
        return torch.where(bad[:, None, None, None], float("nan"), m)


def test_a_slot_with_non_finite_latents_fails_alone_and_the_others_go_on(eng):
    runner = PoisonRunner(eng, PROMPTS[1])
    poisoned = engine.Engine(eng.components, eng.config, runner, eng.device, eng.dtype)
    batcher = Batcher(poisoned, max_batch=8, batch_wait_ms=500, output_type="pt")
    try:
        key = mixed_key(eng, 0)
        jobs = [job(key, i, 1) for i in range(4)]  # job 1's prompt is PROMPTS[1]
        futures = [batcher.submit(j) for j in jobs]
        with pytest.raises(ModelError, match="NonFiniteOutputError: NaN or inf in the x0 estimate "
                                             "in step 1 of 6"):
            futures[1].result(timeout=120)
        assert_alone(eng, [(j, futures[i].result(timeout=120)) for i, j in enumerate(jobs) if i != 1])
    finally:
        batcher.stop()
    assert batcher.running_images == 0 and batcher.batches == 6


def test_image_and_inpaint_requests_share_steps_with_text_ones_and_equal_their_alone_runs(eng):
    """A slot may start at any step of its plan: image-to-image runs the last steps, inpainting
    also keeps its region after each step; all share UNet calls with text-to-image."""
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 32, 32, generator=g)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 4:20] = 1.0
    cases = [(0, {}), (1, dict(image=image, strength=0.6)), (2, dict(image=image, mask_image=mask,
             strength=1.0)), (3, dict(image=image, mask_image=mask, strength=0.5)), (4, {})]
    jobs, requests = [], []
    for i, extra in cases:
        key = mixed_key(eng, i)
        j = job(key, i, 1)
        kw = dict(prompt=list(j.prompts), negative_prompt=list(j.negative_prompts) if key.cfg else None,
                  num_inference_steps=key.steps, guidance_scale=key.guidance_scale,
                  guidance_rescale=key.guidance_rescale, eta=key.eta, **extra)
        j.request = eng.with_config(key.config).prepare(generator=j.generators(), **kw)
        jobs.append(j)
        requests.append((key, kw))
    sizes = []
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=200, output_type="pt",
                      on_batch=lambda n, s: sizes.append(n))
    try:
        results = [f.result(timeout=120) for f in [batcher.submit(j) for j in jobs]]
    finally:
        batcher.stop()
    assert max(sizes) == len(cases)  # all in one UNet call at first
    for j, (key, kw), images in zip(jobs, requests, results):
        want = eng.with_config(key.config).run(generator=j.generators(), output_type="pt", **kw).images
        torch.testing.assert_close(images, want, rtol=0, atol=ATOL)
    kept = (mask < 0.5).expand(1, 3, 32, 32)
    for images in results[2:4]:  # pixel space: the kept region is the input, exactly
        assert torch.equal(images[kept], image[kept])
