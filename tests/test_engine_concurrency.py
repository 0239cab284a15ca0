"""One engine shared by threads: 8 threads x 50 requests give exactly the serial results."""
import threading

import pytest
import torch

from lumen import engine

PROMPTS = {
    "default": ["a red circle on a solid black background", "a white square on a solid white background",
                "a blue triangle", "dark gray background"],
    "clip": ["a cat", "a dog on grass", "red", "a very long prompt about a house by the sea"],
}
THREADS, PER_THREAD = 8, 50


def request(name, i):
    """Request i: its prompt, negative prompt, seed, sampler and eta (mixed across i)."""
    prompts = PROMPTS[name]
    sampler, eta = [("ddim", 0.0), ("euler_ancestral", 1.0), ("dpmpp_2m", 0.0), ("ddim", 0.5)][i % 4]
    return dict(prompt=prompts[i % 4], negative_prompt=prompts[(i + 1) % 4], seed=i % 7,
                sampler=sampler, eta=eta)


def generate(eng, prompt, negative_prompt, seed, sampler, eta):
    return eng.with_config(eng.config.replace(sampler=sampler)).run(
        prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=2, eta=eta, height=16,
        width=16, generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.fixture(scope="module")
def engines(tiny_pipeline_dir):
    return {"default": engine.build("default"), "clip": engine.build(str(tiny_pipeline_dir))}


def test_threads_sharing_one_engine_get_the_serial_results(engines):
    jobs = [("default" if i % 2 else "clip", i) for i in range(28)]  # 28 distinct requests
    serial = {job: generate(engines[job[0]], **request(*job)) for job in jobs}
    results, errors = {}, []

    def work(t):
        try:
            for k in range(PER_THREAD):
                job = jobs[(7 * t + k) % len(jobs)]
                results[(t, k)] = (job, generate(engines[job[0]], **request(*job)))
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors[:3]
    assert len(results) == THREADS * PER_THREAD
    for job, latents in results.values():
        assert torch.equal(latents, serial[job]), job
