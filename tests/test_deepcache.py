"""DeepCache against the DeepCache package's own DeepCacheSDHelper on diffusers'
StableDiffusionPipeline: same tiny model, scheduler and seed, latents to 1e-4
(docs/api.md#deepcache)."""
import pytest
import torch

from lumen import engine

from conftest import make_tiny_pipeline, make_tiny_unet

DeepCache = pytest.importorskip("DeepCache", reason="the parity oracle is the DeepCache package")
PROMPT, NEGATIVE = "a cat", "a dog"


@pytest.fixture(scope="module")
def pipe():
    p = make_tiny_pipeline(make_tiny_unet(seed=6, layers_per_block=2))
    p.set_progress_bar_config(disable=True)
    return p


def theirs(pipe, interval, branch, steps=10):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images
    finally:
        helper.disable()


def ours(eng, interval, branch, steps=10, **kw):
    return eng.run(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                   guidance_rescale=0.0, cache_interval=interval, cache_branch_id=branch,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("branch", [0, 1])
def test_matches_the_deepcache_packages_own_helper(pipe, interval, branch):
    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    got, want = ours(eng, interval, branch), theirs(pipe, interval, branch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    full = ours(eng, 1, 0)
    assert float((got - full).abs().max()) > 1e-3  # the cache changed the result
    # the UNet is left as it was: a plain run after a cached one equals a plain run
    torch.testing.assert_close(ours(eng, 1, 0), full, rtol=0, atol=0)


def test_the_cached_loop_replays_from_a_graph_keyed_by_interval_and_branch(pipe):
    from test_graphs import graphed

    eager = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    eng = graphed(eager)
    for interval, branch in ((3, 0), (3, 0), (2, 1)):
        torch.testing.assert_close(ours(eng, interval, branch), ours(eager, interval, branch),
                                   rtol=0, atol=0)
    assert sorted(k.deepcache for k in eng.graphs.keys()) == [(2, 1), (3, 0)]
    assert (eng.graphs.captures, eng.graphs.replays) == (2, 3)


def test_the_cached_loop_has_no_host_sync(pipe):
    from test_pipeline import NoHostSync

    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    request = eng.prepare(PROMPT, num_inference_steps=6, cache_interval=3, cache_branch_id=1,
                          generator=torch.Generator().manual_seed(0))
    with NoHostSync():
        out = eng.sample(**request)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache_interval=0), "cache_interval=0"),
    (dict(cache_interval=11), "cache_interval=11"),
    (dict(cache_interval=2, cache_branch_id=6), r"cache_branch_id=6; expected .* 4\]"),
])
def test_bad_cache_settings_are_refused(pipe, kwargs, message):
    eng = engine.build(pipe, device="cpu")
    with pytest.raises(engine.InvalidInputError, match=message):
        eng.run(PROMPT, num_inference_steps=10, **kwargs)


def test_compiled_unet_runs_the_cached_loop(pipe):
    """torch.compile compiles DeepCache's clone of the UNet (its blocks' switch is constant per
    graph: full and shallow compile once each) and gives the eager image."""
    eager = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    compiled = engine.build(pipe, scheduler=pipe.scheduler, device="cpu",
                            backend_options={"compile": True})
    got = ours(compiled, 3, 1, steps=6)
    torch.testing.assert_close(got, ours(eager, 3, 1, steps=6), rtol=1e-4, atol=1e-4)
    cached = compiled.runner.cached()[0]
    assert cached.module is not cached.unet  # the clone ran compiled
    assert cached.unet.down_blocks[0] is not pipe.unet.down_blocks[0]  # a clone ...
    assert cached.unet.conv_in.weight is pipe.unet.conv_in.weight  # ... sharing the weights
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    torch.testing.assert_close(ours(compiled, 3, 1, steps=6), got, rtol=0, atol=0)  # no drift
    assert counters["stats"]["unique_graphs"] == graphs  # the second run compiled nothing


def test_generate_and_bench_take_deepcache(tmp_path, capsys):
    """`lumen generate --cache-interval` and the `deepcache` bench row, on the built-in model."""
    import json

    from lumen.cli import main

    out = tmp_path / "dc.png"
    assert main(["generate", "a red circle on a solid black background", "--steps", "6",
                 "--cache-interval", "3", "-o", str(out)]) == 0 and out.stat().st_size > 0
    assert main(["generate", "a red circle on a solid black background", "--steps", "6",
                 "--cache-interval", "9", "-o", str(out)]) == 2
    assert "cache_interval=9" in capsys.readouterr().err
    assert main(["bench", "--model", "default", "--steps", "6", "--iters", "1", "--rows", "eager",
                 "deepcache", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("bench-*.json")
    rows = {r["row"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["deepcache"]["max_diff"] > 0 and rows["deepcache"]["loop_ms"] > 0


def test_the_deepcache_study_runs_small(tmp_path):
    """`lumen bench deepcache`, every part at a tiny size: the reference interval is exact, the
    cached ones differ, and the solid prompts keep their brightness."""
    import json

    from lumen.cli import main

    threads = torch.get_num_threads()
    assert main(["bench", "deepcache", "--n", "1", "--steps", "5", "--model", "small", "--size",
                 "64", "--psnr-steps", "5", "--iters", "1", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == threads  # the study ran on its own count, then gave ours back
    data = json.loads((tmp_path / "deepcache-quality-psnr-mix.json").read_text())
    psnr = {int(k): v for k, v in data["psnr"].items()}
    assert psnr[1]["psnr_db"] == float("inf") and psnr[1]["speedup"] == 1
    assert all(0 < psnr[i]["psnr_db"] < 100 for i in (2, 3, 5))
    quality = {int(k): v for k, v in data["quality"].items()}
    assert sorted(quality) == [1, 2, 3, 5]
    for q in quality.values():
        assert q["brightness"]["solid black"]["mean"] < 0.2 < 0.8 < q["brightness"]["solid white"]["mean"]
    assert data["mix"]["split"] > 0 and data["mix"]["all_full"] > 0
    assert main(["bench", "deepcache", "--psnr-steps", "4", "--out", str(tmp_path)]) == 2


def test_sdxl_matches_the_helper_on_stable_diffusion_xl_pipeline():
    """DeepCacheSDHelper wraps any pipeline's UNet: on a tiny SDXL base pipeline it is the oracle too."""
    from conftest import make_tiny_sdxl_pipeline

    sdxl = make_tiny_sdxl_pipeline()
    sdxl.set_progress_bar_config(disable=True)
    want = theirs(sdxl, 3, 0)
    got = ours(engine.build(sdxl, scheduler=sdxl.scheduler, device="cpu"), 3, 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_scheduled_images_keep_their_own_cache_and_equal_their_alone_runs():
    """In the step scheduler each image keeps its own deep features. Images at different phases
    of different intervals and branches (and images without DeepCache), with CFG on and off and
    Heun's two evaluations a step, share ticks; a tick splits into one call for the rows at a
    full step and one per branch for the shallow rows, and each image equals its alone run."""
    from lumen.serve.batcher import Batcher
    from lumen.serve.jobs import BatchKey, Job

    from test_serve_batching import ATOL, PROMPTS, wait_until

    eng = engine.build("default")
    cases = [  # sampler, steps, guidance, eta, interval, branch, images
        ("ddim", 6, 7.5, 0.0, 3, 0, 1), ("heun", 3, 1.0, 0.0, 2, 1, 1),
        ("dpmpp_2m", 4, 5.0, 0.0, 1, 0, 1), ("euler_ancestral", 7, 9.0, 0.7, 2, 0, 2),
        ("ddim", 5, 7.5, 0.0, 2, 2, 1)]
    jobs = []
    for i, (sampler, steps, w, eta, interval, branch, n) in enumerate(cases):
        key = BatchKey(32, 32, steps, eng.config.replace(sampler=sampler), w, 0.5, eta,
                       cache_interval=interval, cache_branch_id=branch)
        jobs.append(Job(key, tuple(PROMPTS[(i + k) % 4] for k in range(n)), ("",) * n,
                        tuple(100 * i + k for k in range(n))))
    rows = []  # rows of each UNet call
    hook = eng.components.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    evaluations = []
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=0, output_type="pt",
                      on_batch=lambda n, s: evaluations.append(n))
    try:
        futures = [batcher.submit(jobs[0])]
        wait_until(lambda: batcher.progress()[0].step >= 1)  # the others join at other phases
        futures += [batcher.submit(j) for j in jobs[1:]]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
        hook.remove()
    assert len(rows) > len(evaluations)  # some ticks split into full and shallow calls

    def alone(j, interval):
        key = j.key
        return eng.with_config(key.config).run(
            prompt=list(j.prompts), negative_prompt=[""] * j.n if key.cfg else None,
            generator=j.generators(), num_inference_steps=key.steps,
            guidance_scale=key.guidance_scale, guidance_rescale=key.guidance_rescale, eta=key.eta,
            height=32, width=32, cache_interval=interval, cache_branch_id=key.cache_branch_id,
            output_type="pt").images

    for j, images in zip(jobs, results):
        torch.testing.assert_close(images, alone(j, j.key.cache_interval), rtol=0, atol=ATOL)
    assert float((results[0] - alone(jobs[0], 1)).abs().max()) > 1e-3  # the cache mattered


def test_both_server_apis_take_cache_interval_and_cache_branch_id():
    """The official openai client (extra body) and an A1111 txt2img payload ask for DeepCache;
    the images equal Engine.run's with the same settings (8-bit PNG: one level), the infotext
    says so, and bad values are 422s naming the field while the server keeps serving."""
    import base64
    import io

    import httpx
    import numpy as np
    from openai import OpenAI
    from PIL import Image

    from server_helpers import RunningServer

    eng = engine.build("default")
    prompt = "a red circle on a solid black background"

    def want(seed, steps, interval, branch, sampler="ddim"):
        image = eng.with_config(eng.config.replace(sampler=sampler)).run(
            prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=7.0,
            guidance_rescale=0.7, generator=torch.Generator().manual_seed(seed), height=32,
            width=32, cache_interval=interval, cache_branch_id=branch, output_type="np").images[0]
        return np.round(image * 255).astype(np.int16)

    def got(b64):
        png = Image.open(io.BytesIO(base64.b64decode(b64)))
        return np.asarray(png.convert("RGB")).astype(np.int16), png.text["parameters"]

    server = RunningServer(eng, batch_wait_ms=5, max_pixels=64 * 64)
    try:
        api = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        result = api.images.generate(prompt=prompt, size="32x32", response_format="b64_json",
                                     extra_body={"num_inference_steps": 6, "seed": 3,
                                                 "guidance_scale": 7.0, "sampler": "ddim",
                                                 "cache_interval": 3, "cache_branch_id": 1})
        pixels, text = got(result.data[0].b64_json)
        assert np.abs(pixels - want(3, 6, 3, 1)).max() <= 1
        assert np.abs(pixels - want(3, 6, 1, 0)).max() > 1  # not the uncached image
        assert "DeepCache interval: 3, DeepCache branch: 1" in text
        with httpx.Client(base_url=server.url, timeout=120) as client:
            body = {"prompt": prompt, "seed": 5, "steps": 4, "cfg_scale": 7.0, "width": 32,
                    "height": 32, "sampler_name": "DDIM", "cache_interval": 2, "cache_branch_id": 0}
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 200, r.text
            pixels, text = got(r.json()["images"][0])
            assert np.abs(pixels - want(5, 4, 2, 0)).max() <= 1 and "DeepCache interval: 2" in text
            for bad, field, words in ((dict(cache_interval=0), "cache_interval", "cache_interval=0"),
                                      (dict(cache_interval=5), "cache_interval", "cache_interval=5"),
                                      (dict(cache_interval=2, cache_branch_id=9), "cache_branch_id",
                                       "cache_branch_id=9")):
                r = client.post("/sdapi/v1/txt2img", json={**body, **bad})
                assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
                assert words in r.json()["error"]["message"]
                r = client.post("/v1/images/generations", json={"prompt": prompt, "size": "32x32",
                                                                "num_inference_steps": 4, **bad})
                assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text
            assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # still serving
    finally:
        server.stop()


def test_plain_runs_beside_a_cached_run_are_untouched(pipe):
    """Cached runs use a clone of the UNet's modules: a plain run on another thread at the same
    time sees the UNet as it is, and each thread gets its serial result."""
    import threading

    eng = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    want = {1: ours(eng, 1, 0, steps=6), 3: ours(eng, 3, 0, steps=6)}
    got = {1: [], 3: []}

    def work(interval):
        for _ in range(4):
            got[interval].append(ours(eng, interval, 0, steps=6))
    threads = [threading.Thread(target=work, args=(i,)) for i in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for interval, results in got.items():
        assert len(results) == 4
        for result in results:
            torch.testing.assert_close(result, want[interval], rtol=0, atol=0)


def test_a_cached_run_waits_only_for_its_own_clone(pipe):
    """Each UNet's clone has its own lock: while one engine's cached run holds its clone, another
    engine's cached run goes on; a second run on the held clone waits until it is free."""
    import threading

    held = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    other = engine.build(pipe, scheduler=pipe.scheduler, device="cpu")
    _, switch = held.runner.cached()
    want = ours(other, 3, 0, steps=6)
    done = []
    with switch.lock:  # a cached run of `held` in progress
        free = threading.Thread(target=lambda: done.append(ours(other, 3, 0, steps=6)))
        waiting = threading.Thread(target=lambda: done.append(ours(held, 3, 0, steps=6)))
        free.start(), waiting.start()
        free.join(120)
        assert len(done) == 1 and waiting.is_alive()
    waiting.join(120)
    assert len(done) == 2
    for got in done:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_full_call_keeps_only_what_its_branch_reuses(pipe):
    """A full call keeps the outputs the shallow calls at its branch read, and nothing shallower:
    at the deepest branch fewer than at branch 0, and exactly the keys `reused()` names."""
    from lumen.engine import deepcache

    twin, switch = deepcache.clone(pipe.unet)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(999)
    emb = torch.randn(1, 8, pipe.unet.config.cross_attention_dim)
    counts = {}
    for branch in (0, deepcache.largest_branch(pipe.unet)):
        switch.kept.clear()
        switch.set("full", branch)
        with torch.no_grad():
            twin(x, t, encoder_hidden_states=emb)
        assert set(switch.kept) == set(switch.reused()) and switch.kept
        counts[branch] = len(switch.kept)
    switch.set(None)
    assert counts[deepcache.largest_branch(pipe.unet)] < counts[0] < len(switch.where)
