"""Compile the step kernels for a CUDA target, with or without a GPU, and report each variant.

Triton compiles a kernel to PTX and a cubin with the ptxas it ships; only loading and launching
need a device. `compile_set` runs the real launchers (`guided_step._launch`) over a set of
inputs, so it compiles exactly the specialisations production launches produce. With
`arch=None` on a CUDA machine they launch on the GPU through Triton's own driver; with an int
`arch`, `OfflineDriver` stands in for it: it names the target, reads each cubin's registers
and local memory with cuobjdump (as the real driver reads them when it loads the cubin) and
launches nothing.

Per variant it records registers, spills (local memory words), whether the batch offset is
computed in int64 (TTIR: the program id sign-extended to i64) and how many approximate
divisions the PTX holds (`div.full.f32`, `div.approx.f32`: the interpreter divides exactly).

    python -m lumen.kernels.aot --arch 90 [--full] [--json PATH]
"""
import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

from ._triton import HAVE_TRITON, INTERPRETED, triton

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTIONS = ("v_prediction", "epsilon", "sample")
STEPS = ("noise", "no_noise", "x0_eps")  # x_p with step noise, x_p without, (x0, eps)
SHAPES = {"sd15": (2, 4, 64, 64), "sdxl": (2, 4, 128, 128)}
# Shared memory per block and threads per block on the targets we build for (CUDA's tables).
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class OfflineDriver:
    """Triton's driver interface for compiling to `sm_<arch>` on a machine with no GPU."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = f"offline:sm_{arch}"  # a kernel-cache key no real device shares
        self.utils = self  # Triton reads device properties and loads binaries via `utils`
        self.launcher_cls = lambda src, metadata: (lambda *args: None)  # launches nothing

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.target.arch, 99 * 1024)}

    def load_binary(self, name, cubin, shared, device):
        """(module, function, n_regs, n_spills, max threads), the real driver's answer."""
        regs, local = resource_usage(cubin)
        return None, None, regs, local // 4, 1024


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local memory bytes) of the one function in a cubin, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    if regs is None or local is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text!r}")
    return int(regs.group(1)), int(local.group(1))


def cuobjdump() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = bundled if os.path.exists(bundled) else shutil.which("cuobjdump")
    if path is None:
        raise RuntimeError("cuobjdump not found (Triton's NVIDIA backend ships one)")
    return path


# ---------------------------------------------------------------------------------------------
# Inputs that make the launchers produce each variant


def variants(full: bool = False):
    """(dtype, prediction, cfg, layout, step, size) combinations: each constexpr value once, or
    with full=True also both SD sizes and every layout the engine produces. Layout "per_sample"
    is dense with per-sample scalars (the step scheduler's launches)."""
    layouts = ("dense", "channels_last", "mixed", "noise_view") if full else ("dense", "mixed")
    sizes = tuple(SHAPES) if full else ("sd15",)
    return itertools.product(DTYPES, PREDICTIONS, (True, False), layouts + ("per_sample",), STEPS,
                             sizes)


def launch_inputs(dtype, cfg: bool, layout: str, step: str, size: str, device, i: int = 1):
    """_launch's arguments for one variant; i picks the plan row (alignment must not matter).

    per_sample: sample b at row i + b, with its own w and phi."""
    from lumen.engine.config import SamplerConfig
    from lumen.engine.samplers import plan_ddim, step_schedule

    B, C, H, W = SHAPES[size]
    t, abar = step_schedule(SamplerConfig(), 10)
    dp = plan_ddim(t, abar, 0.5).to(device)
    m = torch.randn(2 * B if cfg else B, C, H, W, device=device).to(dtype)
    x = torch.randn(B, C, H, W, device=device)
    noise = torch.randn(B, 3, C, H, W, device=device)
    z = noise[:, 1] if layout == "noise_view" else noise[:, 1].contiguous()
    if layout in ("channels_last", "mixed"):
        m = m.contiguous(memory_format=torch.channels_last)  # mixed: x, z stay contiguous
    if layout == "channels_last":
        x, z = (v.contiguous(memory_format=torch.channels_last) for v in (x, z))
    w, phi = (torch.tensor(v, device=device) for v in (7.5, 0.7))
    rows = slice(i, i + B) if layout == "per_sample" else i
    if layout == "per_sample":
        w, phi = (torch.full((B,), v, device=device) for v in (7.5, 0.7))
    coef = None if step == "x0_eps" else dp.coef[rows]
    return m, x, z if step == "noise" else None, dp.a[rows], dp.s[rows], coef, w, phi


# ---------------------------------------------------------------------------------------------
# Compiling and reporting


def compile_set(arch: int | None = None, full: bool = False, rows: tuple[int, ...] = (1,)) -> list[dict]:
    """Compile every variant for sm_<arch> (None: the current CUDA device); one record each.

    rows: plan rows whose scalars are passed; each row must reuse the same compiled kernels.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed")
    if INTERPRETED:
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1, so they are "
                           "interpreted, not compiled: run without it")
    from triton.runtime import driver

    from .cfg_rescale import _cfg_stats_kernel
    from .guided_step import _launch
    from .sampler_update import _step_kernel

    previous = driver._active
    offline = OfflineDriver(arch) if arch is not None else None
    device = "cpu" if offline else "cuda"
    if offline:
        driver.set_active(offline)
    try:
        for dtype, pred, cfg, layout, step, size in variants(full):
            for i in rows:
                _launch(*launch_inputs(dtype, cfg, layout, step, size, device, i), pred, cfg)
        cache_device = offline.device if offline else driver.active.get_current_device()
        return [record(fn, kernel) for fn in (_cfg_stats_kernel, _step_kernel)
                for kernel in fn.device_caches[cache_device][0].values()]
    finally:
        driver._active = previous  # reset_active() would build the default (CUDA) driver


def record(fn, kernel) -> dict:
    """One compiled kernel's report: its constexprs and argument types, resources, IR checks."""
    error = None
    try:
        kernel._init_handles()  # loads (or, offline, inspects) the cubin: registers, spills
    except Exception as err:  # out of resources: report it as this variant's failure
        error = f"{type(err).__name__}: {err}"
    names, declared = fn.arg_names, {p.name for p in fn.params if p.is_constexpr}
    constants = {names[k[0]]: v for k, v in kernel.src.constants.items()}
    constexprs = {k: v for k, v in constants.items() if k in declared}
    pointers = {k: v for k, v in kernel.src.signature.items() if str(v).startswith("*")}
    ttir, ptx = kernel.asm.get("ttir", ""), kernel.asm.get("ptx", "")
    pid = re.search(r"(%\S+) = tt.get_program_id x : i32", ttir)
    spills = getattr(kernel, "n_spills", None)
    return dict(kernel=fn.__name__, variant=constexprs, pointers=pointers,
                specialized={k: v for k, v in constants.items() if k not in declared},
                arch=kernel.metadata.target.arch, n_regs=getattr(kernel, "n_regs", None),
                n_spills=spills, shared=kernel.metadata.shared,
                int64_batch_offset=bool(pid and f"arith.extsi {pid.group(1)} : i32 to i64" in ttir),
                approx_divisions=len(re.findall(r"div\.(?:full|approx)\.f32", ptx)),
                ok=error is None and spills == 0, error=error)


def summary(records: list[dict]) -> str:
    """A few lines: variants per kernel, most registers, spills, failures."""
    lines = []
    for name in sorted({r["kernel"] for r in records}):
        rs = [r for r in records if r["kernel"] == name]
        regs = max((r["n_regs"] or 0) for r in rs)
        lines.append(f"{name}: {len(rs)} variants, at most {regs} registers, "
                     f"{sum(bool(r['n_spills']) for r in rs)} with spills, "
                     f"{sum(not r['ok'] for r in rs)} failed, "
                     f"{sum(not r['int64_batch_offset'] for r in rs)} with int32 batch offsets, "
                     f"{sum(r['approx_divisions'] for r in rs)} approximate divisions")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lumen.kernels.aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=None,
                   help="compute capability x10 to compile for offline (90 = H100/H200); "
                        "default: the current CUDA device, launching for real")
    p.add_argument("--full", action="store_true", help="both SD sizes and every layout")
    p.add_argument("--json", default=None, help="write every variant's record here")
    args = p.parse_args(argv)
    if args.arch is None and not torch.cuda.is_available():
        p.error("no CUDA device: pass --arch (e.g. 90) to compile offline")
    records = compile_set(args.arch, args.full)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(summary(records))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
