"""GPU-only: the sampling loop captured whole in one CUDA graph replays like eager execution."""
import pytest
import torch

from lumen import engine
from lumen.engine import SamplerConfig
from lumen.engine.graphs import GraphCache

from conftest import make_tiny_unet

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              # any warning from the graph path (a CPU no-op, a capture problem) fails the test
              pytest.mark.filterwarnings("error::RuntimeWarning")]


def request(seed, steps=10, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 7, 32, generator=g)
    return dict(prompt_embeds=emb, negative_prompt_embeds=torch.randn(1, 7, 32, generator=g),
                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="latent", **kw)


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whole_loop_cuda_graph_replay_equals_eager(sampler, dtype):
    """Same seed, same output: fp32 to 1e-5 (kernel choice may differ inside cuBLAS), fp16 to 1e-3."""
    unet = make_tiny_unet()
    graphed = engine.build(unet, scheduler=SamplerConfig(sampler=sampler), device="cuda",
                           dtype=dtype, cuda_graph=True)
    eager = engine.Engine(graphed.components, graphed.config, graphed.runner, graphed.device,
                          dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    eta = 1.0 if sampler == "ddim" else 0.0
    for seed, w, phi in ((0, 7.5, 0.7), (1, 3.0, 0.0), (2, 12.0, 1.0)):
        args = request(seed, guidance_scale=w, guidance_rescale=phi, eta=eta)
        torch.testing.assert_close(graphed.run(**args).images, eager.run(**args).images,
                                   rtol=tol, atol=tol)
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 3


def test_graphs_share_one_pool_and_replay_in_any_order():
    eng = engine.build(make_tiny_unet(), device="cuda", dtype=torch.float32, cuda_graph=True)
    eager = engine.Engine(eng.components, eng.config, eng.runner, eng.device, eng.dtype)
    kept = []
    for steps in (4, 6, 4, 8, 6):
        args = request(steps, steps=steps)
        out, ref = eng.run(**args).images, eager.run(**args).images
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        kept.append((out, ref))
    # Outputs handed out earlier are not overwritten by later replays in the shared pool.
    for out, ref in kept:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert eng.graphs.captures == 3 and eng.graphs.replays == 5


def test_lru_eviction_frees_graphs_and_recaptures():
    eng = engine.build(make_tiny_unet(), device="cuda", dtype=torch.float32, cuda_graph=True,
                       graph_cache_size=1)
    for steps in (3, 4, 3):
        eng.run(**request(0, steps=steps))
    assert eng.graphs.captures == 3 and eng.graphs.evictions == 2 and len(eng.graphs) == 1


def test_compiled_unet_is_captured_inside_the_loop_graph():
    """The same compiled runner, replayed from a graph and run eagerly, gives the same result."""
    graphed = engine.build(make_tiny_unet(), device="cuda", dtype=torch.float16, cuda_graph=True,
                           backend_options={"compile": True})
    eager = engine.Engine(graphed.components, graphed.config, graphed.runner, graphed.device,
                          graphed.dtype)
    args = request(0, steps=6)
    torch.testing.assert_close(graphed.run(**args).images, eager.run(**args).images,
                               rtol=1e-3, atol=1e-3)
    assert graphed.graphs.captures == 1 and graphed.graphs.replays == 1


def test_graph_cache_uses_cuda_capture_by_default():
    assert GraphCache().capture.__name__ == "capture_cuda"


def test_captured_loop_of_every_key_field_replays_like_eager():
    """Step noise on/off and the prediction type each make their own graph, each exact."""
    eng = engine.build(make_tiny_unet(), device="cuda", dtype=torch.float32, cuda_graph=True)
    eager = engine.Engine(eng.components, eng.config, eng.runner, eng.device, eng.dtype)
    for eta in (0.0, 0.5):
        args = request(3, steps=5, eta=eta)
        torch.testing.assert_close(eng.run(**args).images, eager.run(**args).images,
                                   rtol=1e-5, atol=1e-5)
    eng.config = eager.config = eng.config.replace(prediction_type="sample")
    args = request(4, steps=5)
    torch.testing.assert_close(eng.run(**args).images, eager.run(**args).images,
                               rtol=1e-5, atol=1e-5)
    assert [(k.noise, k.prediction_type) for k in eng.graphs.keys()] == [
        (False, "v_prediction"), (True, "v_prediction"), (False, "sample")]
