"""Step graphs (engine.step_graphs): the scheduler's model step per bucket, padded, replayed.

CUDA graphs need a GPU (tests/test_cuda.py replays real ones). Here the capture function reruns
the captured step on the static buffers, so the bucketing, padding, row placement, keys and
reuse are the production code's own, and each image is compared with its alone run.
"""
import pytest
import torch

from lumen import engine
from lumen.engine.graphs import GraphCache
from lumen.engine.slots import StepInputs
from lumen.engine.step_graphs import BUCKETS, bucket, image_rows, text_rows, step_key
from lumen.serve.batcher import Batcher
from lumen.serve.jobs import BatchKey, Job, prepare

from test_serve_batching import assert_alone, job, mixed_key

CUDA = torch.cuda.is_available()


def capture_by_rerun(step, pool):
    """(replay, output) like capture_cuda's, where replay reruns step on the static buffers."""
    output = step()

    def replay():
        for buffer, value in zip(output, step()):
            buffer.copy_(value)
    return replay, output


@pytest.fixture(scope="module")
def eng():
    return engine.build("default")


def test_buckets_round_up_to_a_power_of_two_then_to_multiples_of_64():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9, 33, 64, 65, 130)] == \
        [0, 1, 2, 4, 8, 8, 16, 64, 64, 128, 192]
    assert BUCKETS[0] == 1


def test_real_rows_sit_in_their_part_of_the_padded_buffers(eng):
    five = torch.zeros(5)
    key = step_key(eng, StepInputs(3, torch.zeros(5, 3, 8, 8), five, torch.zeros(8, 77, 32), {},
                                   five, five, five, five))
    assert (key.cfg_images, key.plain_images) == (4, 2)
    assert image_rows(3, 5, key).tolist() == [0, 1, 2, 4, 5]
    assert text_rows(3, 5, key).tolist() == [0, 1, 2, 4, 5, 6, 8, 9]  # neg, pos, then the others


def test_replayed_step_graphs_give_every_image_its_alone_run(eng):
    """Mixed samplers, steps, guidance and CFG on/off: padded buckets change no image."""
    graphs = GraphCache(16, capture=capture_by_rerun)
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=0, output_type="pt", step_graphs=graphs)
    try:
        jobs = [job(mixed_key(eng, i), i, 1 + i % 2) for i in range(6)]
        futures = [batcher.submit(j) for j in jobs]
        results = [(j, f.result(timeout=120)) for j, f in zip(jobs, futures)]
    finally:
        batcher.stop()
    assert_alone(eng, results)
    assert graphs.replays == batcher.batches  # every UNet call replayed a step graph
    # at most one capture per (CFG bucket, other bucket) seen, never one per call
    assert 1 <= graphs.captures <= 8 and graphs.captures < graphs.replays
    assert all(k.cfg_images in (0, *BUCKETS) and k.plain_images in (0, *BUCKETS) for k in graphs.keys())


def test_a_capture_is_reused_across_requests_of_one_bucket(eng):
    graphs = GraphCache(4, capture=capture_by_rerun)
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=0, output_type="pt", step_graphs=graphs)
    key = BatchKey(32, 32, 3, eng.config, 7.5, 0.7, 0.0)
    try:
        for i in range(3):  # 3 images, then 4: both the CFG bucket of 4
            j = Job(key, ("a red circle on a solid black background",) * (3 + i % 2),
                    ("",) * (3 + i % 2), tuple(range(10 * i, 10 * i + 3 + i % 2)))
            assert_alone(eng, [(j, batcher.submit(j).result(timeout=120))])
    finally:
        batcher.stop()
    assert (graphs.captures, graphs.replays) == (1, 9)


def test_controlnet_ticks_replay_step_graphs_and_give_every_image_its_alone_run():
    """Images with the built-in ControlNet (own scales, a window, guess mode, CFG on and off)
    and images without share ticks replayed from step graphs: one ControlNet call over every
    row, each row weighted by its own scale (zero for the plain images and padding). Each image
    equals its alone run (the scheduler's batch-size rounding on latents, 1e-4)."""
    from lumen.benchmarks.controlnet import control_for
    from lumen.engine.builtin.train_controlnet import control_images

    eng = engine.build("default", controlnet="default")
    prompt = "a red circle on a solid black background"
    image = control_images(control_for(prompt, 1, 3))
    cases = [dict(control_image=image, controlnet_conditioning_scale=0.7),
             dict(num_inference_steps=4),
             dict(control_image=image, guess_mode=True, num_inference_steps=6),
             dict(control_image=image, control_guidance_start=0.3, guidance_scale=1.0),
             dict(control_image=image, guess_mode=True, guidance_scale=1.0, num_inference_steps=3)]
    requests = [{"num_inference_steps": 5, **c} for c in cases]
    graphs = GraphCache(16, capture=capture_by_rerun)
    batcher = Batcher(eng, max_batch=8, batch_wait_ms=300, output_type="latent", step_graphs=graphs)
    try:
        futures = [batcher.submit(Job.prepared(eng.prepare(
            prompt, generator=torch.Generator().manual_seed(i), **kw))) for i, kw in enumerate(requests)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.stop()
    assert graphs.replays == batcher.batches  # every tick replayed, ControlNet ones included
    assert any(k.controlnets for k in graphs.keys()) and batcher.mean_batch_size > 2
    for i, (kw, got) in enumerate(zip(requests, results)):
        want = eng.run(prompt, generator=torch.Generator().manual_seed(i), output_type="latent",
                       **kw).images
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; the CPU tests above rerun "
                                     "the captured step instead of replaying a graph")
def test_cuda_step_graphs_replay_like_the_eager_scheduler():
    from conftest import make_tiny_unet

    graphed = engine.build(make_tiny_unet(), device="cuda", dtype=torch.float16, cuda_graph=True)
    eager = engine.Engine(graphed.components, graphed.config, graphed.runner, graphed.device,
                          graphed.dtype)
    dim = graphed.components.unet.config.cross_attention_dim

    def requests():
        out = []
        for i in range(5):
            g = torch.Generator().manual_seed(i)
            out.append(graphed.prepare(
                prompt_embeds=torch.randn(1 + i % 2, 77, dim, generator=g),
                negative_prompt_embeds=torch.randn(1 + i % 2, 77, dim, generator=g),
                num_inference_steps=3 + i, guidance_scale=1.0 if i == 2 else 7.5,
                generator=[torch.Generator().manual_seed(100 + i + k) for k in range(1 + i % 2)]))
        return out
    results = []
    for eng in (graphed, eager):
        batcher = Batcher(eng, max_batch=8, batch_wait_ms=50, output_type="latent")
        try:
            futures = [batcher.submit(Job.prepared(r)) for r in requests()]
            results.append([f.result(timeout=300) for f in futures])
        finally:
            batcher.stop()
        assert (batcher.step_graphs is not None) == (eng is graphed)
    # fp16 UNet: cuBLAS picks kernels by batch shape, and padding changes the shape. Bounds
    # chosen, not measured (no GPU here): graph vs eager 1e-3; against each request alone
    # through Engine.sample (the whole-loop graph), the fp16 bench rows' 2e-2.
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    for r, latents in zip(requests(), results[0]):
        torch.testing.assert_close(latents, graphed.sample(**r), atol=2e-2, rtol=0)


def test_the_captured_model_step_has_no_host_sync(eng):
    """What a step graph captures (engine.slots.model_step) reads no device value on the host:
    CFG and unguided images, per-sample timesteps, scalars and plans, in one call."""
    from lumen.engine import slots

    from test_pipeline import NoHostSync

    running = []
    for i in range(4):
        k = mixed_key(eng, i)
        running += slots.split(eng, prepare(eng, job(k, i, 1)))
    slots.tick(eng, running)  # every slot at its second evaluation point
    ordered = [s for s in running if s.cfg] + [s for s in running if not s.cfg]
    inputs = slots.StepInputs.gather(ordered, [slots.model_input(s) for s in ordered])
    assert 0 < inputs.n_cfg < len(ordered)
    with NoHostSync():
        x0, eps = slots.model_step(eng, eng.runner, inputs)
    assert x0.shape == eps.shape == inputs.x.shape and bool(torch.isfinite(x0).all())
