"""GPU-only: the sampling loop captured whole in one CUDA graph replays like eager execution."""
import pytest
import torch

import engine
from engine import SamplerConfig
from engine.samplers import make_plan

from conftest import make_tiny_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m"])
def test_whole_loop_cuda_graph_replay_equals_eager(sampler):
    eng = engine.build(make_tiny_unet(), scheduler=SamplerConfig(sampler=sampler), device="cuda",
                       dtype=torch.float32)
    g = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(2, 7, 32, device="cuda", generator=g)
    x_T = torch.randn(1, 4, 8, 8, device="cuda", generator=g)
    noise = torch.randn(1, 10, 4, 8, 8, device="cuda", generator=g)
    dp = make_plan(eng.config, 10, eta=1.0 if sampler == "ddim" else 0.0).to("cuda")
    w, phi = torch.tensor(7.5, device="cuda"), torch.tensor(0.7, device="cuda")
    eager = eng.sample(emb, x_T, noise, dp, w, phi, cfg=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eng.sample(emb, x_T, noise, dp, w, phi, cfg=True)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = eng.sample(emb, x_T, noise, dp, w, phi, cfg=True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
    w.fill_(3.0)  # a new guidance value needs no recapture
    graph.replay()
    torch.testing.assert_close(captured, eng.sample(emb, x_T, noise, dp, w, phi, cfg=True), rtol=1e-5, atol=1e-5)
