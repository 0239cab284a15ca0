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


def test_backends_without_a_shallow_branch_refuse_it(pipe):
    eng = engine.build(pipe, device="cpu", backend_options={"compile": True})
    with pytest.raises(engine.InvalidInputError, match="cache_interval=2 with torch.compile"):
        eng.run(PROMPT, num_inference_steps=4, cache_interval=2)


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


def test_sdxl_matches_the_helper_on_stable_diffusion_xl_pipeline():
    """DeepCacheSDHelper wraps any pipeline's UNet: on a tiny SDXL base pipeline it is the oracle too."""
    from conftest import make_tiny_sdxl_pipeline

    sdxl = make_tiny_sdxl_pipeline()
    sdxl.set_progress_bar_config(disable=True)
    want = theirs(sdxl, 3, 0)
    got = ours(engine.build(sdxl, scheduler=sdxl.scheduler, device="cpu"), 3, 0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
