"""The graph cache and static buffers of engine.graphs, on CPU.

CUDA graphs need a GPU (tests/test_cuda.py replays real ones). Here the capture function is
swapped for `capture_by_rerun`, whose replay reruns the loop on the static buffers only: every
request value that `StaticInputs.load` failed to copy in would show up as a wrong result, and
keys, LRU eviction and the capture-failure error are the production code's own.
"""
import warnings

import pytest
import torch

from lumen import engine
from lumen.engine import InvalidInputError, SamplerConfig
from lumen.engine.graphs import CaptureError, GraphCache, GraphCaptureError, resolve_mode

from conftest import make_tiny_unet


def capture_by_rerun(loop, pool):
    """(replay, output) like capture_cuda's, where replay reruns loop on the static buffers."""
    output = loop()

    def replay():
        output.copy_(loop())
    return replay, output


def graphed(eng, capacity=4, capture=capture_by_rerun):
    """The same engine with the graph path on and a CPU capture function."""
    twin = engine.Engine(eng.components, eng.config, eng.runner, eng.device, eng.dtype,
                         cuda_graph=True, graphs=GraphCache(capacity, capture=capture))
    return twin


@pytest.fixture(scope="module")
def eager():
    return engine.build(make_tiny_unet(), device="cpu", cuda_graph=False)


def request(seed=0, steps=4, batch=1, seq=7, **kw):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, seq, 32, generator=g)
    args = dict(prompt_embeds=emb, negative_prompt_embeds=torch.randn(batch, seq, 32, generator=g),
                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + 100),
                output_type="latent")
    return {**args, **kw}


def run(eng, **kw):
    return eng.run(**request(**kw)).images


def test_new_values_replay_without_recapture_and_match_eager(eager):
    eng = graphed(eager)
    changes = [dict(), dict(seed=1), dict(guidance_scale=3.0), dict(guidance_rescale=0.0),
               dict(seed=2, guidance_scale=12.0, guidance_rescale=1.0)]
    for change in changes:
        torch.testing.assert_close(run(eng, **change), run(eager, **change), rtol=0, atol=0)
    assert (eng.graphs.captures, eng.graphs.replays, len(eng.graphs)) == (1, len(changes), 1)


def test_new_eta_replays_and_step_noise_on_off_is_a_new_capture(eager):
    """eta = 0 draws no step noise (no buffer, no noise term); any eta > 0 shares one graph."""
    eng = graphed(eager)
    changes = [dict(), dict(eta=1.0), dict(seed=2, eta=0.3, guidance_scale=12.0), dict(seed=4)]
    for change in changes:
        torch.testing.assert_close(run(eng, **change), run(eager, **change), rtol=0, atol=0)
    assert (eng.graphs.captures, eng.graphs.replays) == (2, len(changes))
    with_noise, without = eng.graphs.keys()  # least recently used first: seed=4 ran last
    assert (with_noise.noise, without.noise) == (True, False)
    assert eng.graphs.entries[without].inputs.noise is None


def test_new_spacing_reuses_the_graph_through_the_plan_buffers(eager):
    eng = graphed(eager)
    run(eng)
    for spacing in ("linspace", "leading"):
        eng.config = eager.config.replace(timestep_spacing=spacing)
        twin = engine.Engine(eager.components, eng.config, eager.runner, eager.device, eager.dtype)
        torch.testing.assert_close(run(eng), run(twin), rtol=0, atol=0)
    assert eng.graphs.captures == 1


@pytest.mark.parametrize("change", [dict(steps=5), dict(batch=2), dict(seq=9),
                                    dict(guidance_scale=1.0)])
def test_shape_steps_or_cfg_change_is_a_new_capture(eager, change):
    eng = graphed(eager)
    run(eng)
    torch.testing.assert_close(run(eng, **change), run(eager, **change), rtol=0, atol=0)
    assert eng.graphs.captures == 2
    first, second = eng.graphs.keys()
    assert first != second


def test_cache_is_bounded_and_evicts_the_least_recently_used(eager):
    eng = graphed(eager, capacity=2)
    run(eng, steps=2), run(eng, steps=3)
    run(eng, steps=2)  # 2 is now the most recent
    run(eng, steps=4)  # evicts 3
    assert [k.steps for k in eng.graphs.keys()] == [2, 4]
    assert (eng.graphs.captures, eng.graphs.evictions) == (3, 1)
    run(eng, steps=3)
    assert eng.graphs.captures == 4


def test_keys_name_the_request_shape(eager):
    eng = graphed(eager)
    run(eng, steps=6, batch=2, seq=5)
    (key,) = eng.graphs.keys()
    assert (key.batch, key.height, key.width, key.seq_len, key.steps, key.sampler, key.dtype,
            key.backend, key.cfg) == (2, 8, 8, 5, 6, "ddim", "float32", "torch", True)


def test_heun_corrector_structure_is_part_of_the_key():
    unet = make_tiny_unet()
    eng = graphed(engine.build(unet, scheduler=SamplerConfig(sampler="heun"), device="cpu"))
    zero_snr = run(eng)
    eng.config = SamplerConfig(sampler="heun", zero_terminal_snr=False, prediction_type="epsilon")
    plain = engine.Engine(eng.components, eng.config, eng.runner, eng.device, eng.dtype)
    torch.testing.assert_close(run(eng), run(plain), rtol=0, atol=0)
    first, second = eng.graphs.keys()
    assert first.corrector != second.corrector and eng.graphs.captures == 2
    assert zero_snr.shape == (1, 4, 8, 8)


def test_failed_capture_raises_with_the_cause_and_the_way_out(eager):
    def failing(loop, pool):
        loop()  # the warm-up ran; the capture itself failed
        raise CaptureError("RuntimeError: operation not permitted when stream is capturing")

    eng = graphed(eager, capture=failing)
    with pytest.raises(GraphCaptureError, match="operation not permitted.*cuda_graph=False"):
        run(eng)
    assert len(eng.graphs) == 0 and eng.graphs.captures == 0
    assert isinstance(GraphCaptureError("x"), engine.LumenError)


def test_a_loop_that_fails_to_run_is_an_error_not_a_fallback(eager):
    def warm_up_fails(loop, pool):
        raise torch.OutOfMemoryError("CUDA out of memory")

    eng = graphed(eager, capture=warm_up_fails)
    with pytest.raises(torch.OutOfMemoryError):
        run(eng)
    assert len(eng.graphs) == 0 and eng.graphs.captures == 0


def test_the_cache_keeps_each_graphs_runner_alive(eager):
    """A CUDA graph holds raw addresses of its runner's buffers: the runner must outlive it."""
    import gc
    import weakref

    class Runner:
        made = []

        def __call__(self, x, t, emb, **added):
            return eager.runner(x, t, emb, **added)

        def for_graph(self):
            Runner.made.append(Runner())
            return Runner.made[-1]

    def capture_keeps_nothing(loop, pool):  # like torch: the graph does not hold the Python loop
        return (lambda: None), loop()

    eng = engine.Engine(eager.components, eager.config, Runner(), eager.device, eager.dtype,
                        cuda_graph=True, graphs=GraphCache(4, capture=capture_keeps_nothing))
    run(eng)
    alive = weakref.ref(Runner.made.pop())
    gc.collect()
    assert alive() is not None
    eng.graphs.clear()
    gc.collect()
    assert alive() is None


def test_output_is_not_the_replayed_buffer(eager):
    eng = graphed(eager)
    first = run(eng)
    kept = first.clone()
    run(eng, seed=5)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_callback_sees_every_step_after_a_replay(eager):
    eng = graphed(eager)
    seen = []
    run(eng, steps=5, callback=seen.append)
    assert seen == [0, 1, 2, 3, 4]


def test_cuda_graph_on_cpu_is_a_noop_that_says_so(tiny_unet):
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        eng = engine.build(tiny_unet, device="cpu", cuda_graph=True)
    assert eng.cuda_graph is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.build(tiny_unet, device="cpu").cuda_graph is False  # "auto": no warning


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_cuda_graph_value_is_refused(tiny_unet, value):
    with pytest.raises(InvalidInputError, match=f"cuda_graph={value!r}; expected 'auto', True or False"):
        engine.build(tiny_unet, device="cpu", cuda_graph=value)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_graph_cache_size_is_refused(tiny_unet, size):
    with pytest.raises(InvalidInputError, match=f"graph_cache_size={size!r}; expected an int >= 1"):
        engine.build(tiny_unet, device="cpu", graph_cache_size=size)


def test_graph_mode_per_device_and_backend():
    cuda = torch.device("cuda")
    assert resolve_mode("auto", cuda, "torch") and resolve_mode(True, cuda, "tensorrt")
    assert resolve_mode("auto", cuda, "onnxruntime") is False
    assert resolve_mode(False, cuda, "torch") is False
    with pytest.raises(InvalidInputError, match="onnxruntime runs on its own stream"):
        resolve_mode(True, cuda, "onnxruntime")


def test_compile_option_is_validated(tiny_unet):
    for value, message in (("reduce-overhead", "capture CUDA graphs of its own"),
                           ("fast", "compile='fast'; expected True, False or one of")):
        with pytest.raises(InvalidInputError, match=message):
            engine.build(tiny_unet, device="cpu", backend_options={"compile": value})
    with pytest.raises(InvalidInputError, match="expected none but 'compile'"):
        engine.build(tiny_unet, device="cpu", backend_options={"cache_dir": "x"})


def test_compiled_unet_matches_eager(eager):
    """torch.compile (inductor; ~1.5 min on 2 CPU cores for this tiny UNet) vs the eager module."""
    compiled = engine.build(make_tiny_unet(), device="cpu", backend_options={"compile": True})
    assert compiled.runner.module is not compiled.runner.unet
    torch.testing.assert_close(run(compiled, steps=2), run(eager, steps=2), rtol=1e-4, atol=1e-4)


def test_kernel_mode_and_prediction_type_are_part_of_the_key(eager, monkeypatch):
    """A graph bakes in the step kernels and the output conversion: changing either recaptures."""
    eng = graphed(eager)
    monkeypatch.setenv("LUMEN_KERNELS", "reference")
    reference = run(eng)
    monkeypatch.setenv("LUMEN_KERNELS", "triton")  # the Triton kernels, interpreted on CPU
    fused = run(eng)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    eng.config = eager.config.replace(prediction_type="sample")
    run(eng)
    keys = eng.graphs.keys()
    assert [(k.kernels, k.prediction_type) for k in keys] == [
        ("reference", "v_prediction"), ("triton", "v_prediction"), ("triton", "sample")]
    assert eng.graphs.captures == 3


def test_clear_drops_the_graphs_and_their_pool(eager):
    eng = graphed(eager)
    run(eng)
    eng.graphs._pool = (0, 1)  # what torch.cuda.graph_pool_handle() returns on CUDA
    eng.graphs.clear()
    assert len(eng.graphs) == 0 and eng.graphs._pool is None
    run(eng)
    assert eng.graphs.captures == 2
