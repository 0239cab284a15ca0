"""The GPU check's device stages: environment and ceilings, the CUDA tests, the fused step.

Each stage is `stage(sizes, out) -> {"headline", "figures", "checks"}` (see gpu_check.py) and
runs in its own process; a check is {"name", "ok", "detail"}.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(atol=1e-5, rtol=1e-5)  # tests/test_kernels.py's: kernel and reference are both fp32
PACKAGES = ("torch", "triton", "diffusers", "transformers", "huggingface-hub", "safetensors",
            "Pillow", "numpy", "onnxruntime", "tensorrt")


def check(name: str, ok, detail: str) -> dict:
    return dict(name=name, ok=bool(ok), detail=detail)


def median_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() over reps calls after one warm-up call.

    CUDA: events around each call (device time); CPU: the wall clock.
    """
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# env: versions and the two ceilings


def env(sizes, out: Path) -> dict:
    """Device, driver, library versions; copy bandwidth and matmul rate, measured once."""
    device = torch.device(sizes.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return dict(headline="no CUDA device", figures=versions(), checks=[check(
            "CUDA device present", False, f"torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda})")])
    figures = dict(device_facts(device), **versions())
    figures["copy_gbps"] = copy_gbps(device, sizes.copy_mib, sizes.reps)
    figures["matmul_tflops"], figures["matmul_dtype"] = matmul_tflops(device, sizes.matmul_n,
                                                                      sizes.reps)
    figures.update(copy_mib=sizes.copy_mib, matmul_n=sizes.matmul_n)
    ok = figures["copy_gbps"] > 0 and figures["matmul_tflops"] > 0
    headline = (f"{figures['device']}: copy {figures['copy_gbps']:.4g} GB/s, matmul "
                f"{figures['matmul_tflops']:.4g} TFLOP/s ({figures['matmul_dtype']})")
    return dict(headline=headline, figures=figures, checks=[
        check("ceilings measured", ok, f"copy of {sizes.copy_mib} MiB, {sizes.matmul_n}^3 matmul")])


def versions() -> dict:
    """Installed versions (from package metadata: nothing is imported), "absent" if missing."""
    found = dict(python=platform.python_version(), cuda=torch.version.cuda or "none")
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def device_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(device=f"cpu ({torch.get_num_threads()} threads)", memory_gib=None,
                    capability=None, driver=None)
    props = torch.cuda.get_device_properties(device)
    return dict(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                capability=f"sm_{props.major}{props.minor}", driver=driver_version())


def driver_version() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unknown ({type(err).__name__})"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 else "unknown"


def copy_gbps(device: torch.device, mib: int, reps: int) -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, in GB/s."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_ms(lambda: dst.copy_(src), device, reps) / 1e6


def matmul_tflops(device: torch.device, n: int, reps: int) -> tuple[float, str]:
    """(TFLOP/s of an n x n x n matmul, its dtype): fp16 on CUDA, fp32 on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, reps)
    return 2 * n**3 / ms / 1e9, str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# tests: pytest in a subprocess, outcomes from its JUnit XML


def tests(sizes, out: Path) -> dict:
    """The tests that need CUDA; passes, failures and skips counted apart."""
    xml = out / "tests.xml"
    xml.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *sizes.tests]
    print(" ".join(command), flush=True)
    code = subprocess.run(command, cwd=ROOT).returncode  # output goes to this stage's log
    if not xml.exists():
        return dict(headline=f"pytest exited with {code}, no report", figures={}, checks=[
            check("pytest ran", False, f"exit status {code}, no {xml.name} written")])
    cases = junit_cases(xml)
    n = Counter(c["outcome"] for c in cases)
    failed = [c["test"] for c in cases if c["outcome"] in ("fail", "error")]
    skipped = [f"{c['test']} ({c['message']})" for c in cases if c["outcome"] == "skip"]
    checks = [check("no test failed", not failed and code in (0, 5), ", ".join(failed) or
                    f"pytest exit status {code}"),
              check("some test passed", n["pass"] > 0, f"{n['pass']} passed")]
    if not sizes.tests_may_skip:
        checks.append(check("nothing skipped on the device", not skipped,
                            "; ".join(skipped) or "no skips"))
    headline = (f"{n['pass']} passed, {n['fail'] + n['error']} failed, {n['skip']} skipped "
                f"(of {len(cases)})")
    return dict(headline=headline, checks=checks,
                figures=dict(counts=dict(n), pytest_args=list(sizes.tests), tests=cases))


def junit_cases(path: Path) -> list[dict]:
    """[{test, outcome: pass|fail|error|skip, message}] from pytest's JUnit XML."""
    cases = []
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "pass", ""
        for tag, name in (("failure", "fail"), ("error", "error"), ("skipped", "skip")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, found.get("message", "")[:300]
                break
        cases.append(dict(test=f"{case.get('classname')}::{case.get('name')}",
                          outcome=outcome, message=message))
    return cases


# ---------------------------------------------------------------------------------------------
# kernels: compiled Triton guided step vs the eager torch chain (its reference)


def kernels_stage(sizes, out: Path) -> dict:
    """Error, latency, GB/s and speed-up of kernels.guided_step; registers of the kernels."""
    from lumen import kernels
    from lumen.benchmarks.bench_kernels import step_args

    device = torch.device(sizes.device)
    ceiling, source = copy_ceiling(sizes, out, device)
    rows = []
    for case in sizes.kernel_cases:
        for dtype in (torch.float16, torch.bfloat16):
            for cfg in (True, False):
                rows.append(step_row(replace(case, model_dtype=dtype), cfg, device, sizes.reps,
                                     ceiling))
                print(json.dumps(rows[-1]), flush=True)
    triton_path = kernels.use_triton(step_args(sizes.kernel_cases[0], device.type)["x"])
    bad = [f"{r['case']} {r['model_dtype']} cfg={r['cfg']}: {r['max_abs_err']:.1e}"
           for r in rows if not r["within_tol"]]
    registers = compiled_registers(sizes.aot_arch, out)
    checks = [check("Triton path selected", triton_path, f"kernels.use_triton on {device.type} "
                    f"with LUMEN_KERNELS={os.environ.get('LUMEN_KERNELS', 'auto')}"),
              check("guided step matches its reference", not bad, "; ".join(bad) or
                    f"max abs error {max(r['max_abs_err'] for r in rows):.1e} <= "
                    f"{TOL['atol']:g} + {TOL['rtol']:g} |ref| in {len(rows)} cases"),
              *registers.pop("checks")]
    best = max(rows, key=lambda r: r["gbps"])
    headline = (f"max err {max(r['max_abs_err'] for r in rows):.1e}; best {best['gbps']:.4g} "
                f"GB/s ({best['of_copy']:.3g} of copy), {best['speedup']:.3g}x eager "
                f"({best['case']} {best['model_dtype']}); {registers['summary']}")
    return dict(headline=headline, checks=checks, figures=dict(
        copy_gbps=ceiling, copy_from=source, steps=rows, registers=registers))


def copy_ceiling(sizes, out: Path, device: torch.device) -> tuple[float, str]:
    """The env stage's copy bandwidth when it ran into this folder, else measured here."""
    env_record = out / "stage-env.json"
    if env_record.exists():
        gbps = json.loads(env_record.read_text())["figures"].get("copy_gbps")
        if gbps:
            return gbps, "env stage"
    return copy_gbps(device, sizes.copy_mib, sizes.reps), "measured in this stage"


def step_row(case, cfg: bool, device: torch.device, reps: int, ceiling: float) -> dict:
    """One configuration: max error, fused and eager latency, GB/s of the fused step."""
    from lumen import kernels
    from lumen.benchmarks.bench_kernels import step_args

    args = step_args(case, device.type)
    if not cfg:
        args = dict(args, m=args["m"][case.batch:], cfg=False)  # the positive half alone
    out, ref = kernels.guided_step(**args), kernels.guided_step_reference(**args)
    err = (out - ref).abs()
    fused_ms = median_ms(lambda: kernels.guided_step(**args), device, reps)
    eager_ms = median_ms(lambda: kernels.guided_step_reference(**args), device, reps)
    # the least a step moves: read m, x and z once, write x_p once
    moved = sum(t.numel() * t.element_size() for t in (args["m"], args["x"], args["noise_i"], out))
    gbps = moved / fused_ms / 1e6
    return dict(case=case.name, model_dtype=str(case.model_dtype).removeprefix("torch."),
                cfg=cfg, max_abs_err=float(err.max()),
                within_tol=bool((err <= TOL["atol"] + TOL["rtol"] * ref.abs()).all()),
                fused_us=fused_ms * 1e3, eager_us=eager_ms * 1e3, bytes=moved, gbps=gbps,
                of_copy=gbps / ceiling, speedup=eager_ms / fused_ms)


def compiled_registers(arch: int | None, out: Path) -> dict:
    """Registers and spills per compiled variant (kernels.aot.compile_set), or why not.

    In a fresh interpreter without TRITON_INTERPRET: compile_set refuses interpreted kernels.
    """
    path = out / "registers.json"
    path.unlink(missing_ok=True)
    code = ("import json, sys; from lumen.kernels import aot; "
            f"json.dump(aot.compile_set(arch={arch!r}), open(sys.argv[1], 'w'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    last = (done.stderr.strip().splitlines() or [""])[-1]
    if done.returncode:
        print(done.stderr, flush=True)
        return dict(available=False, summary="registers: compile_set failed", error=last,
                    checks=[check("kernels.aot.compile_set ran", False, last)])
    variants = json.loads(path.read_text())
    broken = [f"{v['kernel']} {v['variant']}: {v['error']}" for v in variants if not v["ok"]]
    built = [v for v in variants if v["ok"]]
    summary = (f"{len(built)} variants for {'this device' if arch is None else f'sm_{arch}'}, "
               f"max {max((v['n_regs'] for v in built), default=0)} regs, "
               f"{sum(v['n_spills'] for v in built)} spills")
    return dict(available=True, arch=arch, summary=summary, variants=variants, checks=[
        check("every kernel variant compiles", not broken, "; ".join(broken) or summary)])
