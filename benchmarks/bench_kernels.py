"""The step between two UNet calls: Lumen's fused kernels vs the eager chains, with GB/s.

CPU (pytest-benchmark), Lumen's torch reference vs diffusers' rescale_noise_cfg + DDIMScheduler.step
on an SD1.5 latent batch (2 x 4x64x64):
    pytest benchmarks/bench_kernels.py --benchmark-only
CUDA (triton.testing.do_bench; one row per configuration, warm-up and compile time excluded and
printed separately), for SD1.5, SDXL and a 16-channel batch of 8:
    python -m lumen.benchmarks.bench_kernels
GB/s counts the minimum bytes a step must move (m read once, x and z read, x_p written), for
every row, so the rows compare as speeds against the device-to-device copy of the same bytes.
"""
import time
from dataclasses import dataclass

import torch

from lumen import kernels
from lumen.engine.config import SamplerConfig
from lumen.engine.samplers import plan_ddim, step_schedule

NUM_STEPS, STEP, ETA = 10, 3, 0.0  # eta = 0: diffusers' DDIM is NaN at eta = 1 with zero SNR
GUIDANCE_SCALE, GUIDANCE_RESCALE = 7.5, 0.7


@dataclass(frozen=True)
class Case:
    """One latent shape and the model dtype of its UNet output."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    model_dtype: torch.dtype = torch.float16

    @property
    def shape(self):
        return (self.batch, self.channels, self.height, self.width)

    def step_bytes(self) -> int:
        """Minimum traffic of a guided step: m [2B] read once; x, z read, x_p written (fp32)."""
        n = self.batch * self.channels * self.height * self.width
        return 2 * n * self.model_dtype.itemsize + 3 * n * 4


CASES = {
    "sd15": Case("SD1.5 2x4x64x64", 2, 4, 64, 64),
    "sdxl": Case("SDXL 2x4x128x128", 2, 4, 128, 128),
    "c16": Case("8x16x128x128", 8, 16, 128, 128),
}


def diffusers_scheduler():
    """DDIMScheduler configured as Lumen's default SamplerConfig (zero SNR, v, trailing)."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", set_alpha_to_one=True,
                              clip_sample=False)
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def step_args(case: Case, device: str) -> dict:
    """Inputs of kernels.guided_step for step STEP of a NUM_STEPS-step zero-SNR DDIM plan."""
    g = torch.Generator().manual_seed(0)
    plan = plan_ddim(*step_schedule(SamplerConfig(), NUM_STEPS), ETA).to(device)
    m = torch.randn((2 * case.batch,) + case.shape[1:], generator=g).to(device, case.model_dtype)

    def scalar(v):
        return torch.tensor(v, dtype=torch.float32, device=device)

    return dict(m=m, x=torch.randn(case.shape, generator=g).to(device),
                noise_i=torch.randn(case.shape, generator=g).to(device), a_t=plan.a[STEP],
                s_t=plan.s[STEP], coef_i=plan.coef[STEP],
                guidance_scale=scalar(GUIDANCE_SCALE), guidance_rescale=scalar(GUIDANCE_RESCALE),
                prediction_type="v_prediction", cfg=True)


def diffusers_step(scheduler, args):
    """The diffusers pipeline's op chain: CFG, rescale_noise_cfg, DDIMScheduler.step."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    def step():
        uncond, text = args["m"].chunk(2)
        cfg = uncond + GUIDANCE_SCALE * (text - uncond)
        cfg = rescale_noise_cfg(cfg, text, guidance_rescale=GUIDANCE_RESCALE)
        return scheduler.step(cfg, int(scheduler.timesteps[STEP]), args["x"], eta=ETA).prev_sample
    return step


# ---------------------------------------------------------------------------------------------
# CPU: pytest-benchmark


def _record_parity(benchmark, out, args):
    ref = kernels.guided_step_reference(**args)
    benchmark.extra_info["max_abs_diff_vs_lumen_reference"] = float((out - ref).abs().max())


def test_cpu_lumen_reference_step(benchmark):
    args = step_args(Case("SD1.5 2x4x64x64 fp32", 2, 4, 64, 64, torch.float32), "cpu")
    benchmark.group = "guided step, 2x4x64x64 fp32, CPU"
    out = benchmark(kernels.guided_step_reference, **args)
    _record_parity(benchmark, out, args)


def test_cpu_diffusers_chain_step(benchmark):
    args = step_args(Case("SD1.5 2x4x64x64 fp32", 2, 4, 64, 64, torch.float32), "cpu")
    benchmark.group = "guided step, 2x4x64x64 fp32, CPU"
    out = benchmark(diffusers_step(diffusers_scheduler(), args))
    _record_parity(benchmark, out, args)


# ---------------------------------------------------------------------------------------------
# CUDA: triton.testing.do_bench


def captured(fn):
    """fn recorded in a CUDA graph (Lumen's loop is graph-capturable); returns graph.replay."""
    fn()  # compile and allocate outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cuda_rows(case: Case, args: dict):
    """(label, fn): eager chains, then one optimisation added per row, then the copy roofline."""
    half = case.step_bytes() // 2  # a copy reads and writes: the same bytes as one step
    src = torch.empty(half, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    fused = lambda: kernels.guided_step(**args)  # noqa: E731
    return [
        ("diffusers chain (eager)", diffusers_step(diffusers_scheduler(), args)),
        ("lumen reference (eager torch)", lambda: kernels.guided_step_reference(**args)),
        ("lumen fused Triton (2 launches)", fused),
        ("lumen fused Triton + CUDA graph", captured(fused)),
        ("d2d copy of the same bytes", lambda: dst.copy_(src)),
    ]


def first_call(args: dict) -> tuple[float, float]:
    """(seconds of the first fused step: Triton JIT compile + launch, max |fused - reference|)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = kernels.guided_step(**args)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, float((out - kernels.guided_step_reference(**args)).abs().max())


def report_cuda():
    from triton.testing import do_bench
    print(f"device: {torch.cuda.get_device_name()}; step {STEP} of {NUM_STEPS}, "
          f"w={GUIDANCE_SCALE}, phi={GUIDANCE_RESCALE}, fp16 model output, fp32 state")
    for case in CASES.values():
        args = step_args(case, "cuda")
        seconds, err = first_call(args)
        print(f"\n{case.name}: {case.step_bytes() / 2**20:.2f} MiB per step, first call "
              f"(compile) {seconds:.2f} s, max |fused - reference| {err:.2e}")
        print(f"  {'configuration':34s} {'us':>9s} {'GB/s':>8s} {'vs diffusers':>13s}")
        base = None
        for label, fn in cuda_rows(case, args):
            ms = do_bench(fn, warmup=25, rep=200)
            base = base or ms
            print(f"  {label:34s} {ms * 1e3:9.1f} {case.step_bytes() / ms / 1e6:8.1f} "
                  f"{base / ms:12.2f}x")


def report_cpu():
    """Without CUDA: the CPU comparison, timed with torch.utils.benchmark."""
    from torch.utils.benchmark import Timer
    args = step_args(Case("SD1.5 2x4x64x64 fp32", 2, 4, 64, 64, torch.float32), "cpu")
    rows = [("diffusers chain", diffusers_step(diffusers_scheduler(), args)),
            ("lumen reference", lambda: kernels.guided_step_reference(**args))]
    print("no CUDA device: CPU guided step, 2x4x64x64 fp32 "
          f"({torch.get_num_threads()} threads)")
    for label, fn in rows:
        t = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0)
        print(f"  {label:20s} median {t.median * 1e6:9.1f} us")


def main():
    if torch.cuda.is_available():
        report_cuda()
    else:
        report_cpu()


if __name__ == "__main__":
    main()
