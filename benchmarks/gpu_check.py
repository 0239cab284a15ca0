"""`lumen bench gpu` (also `python -m lumen.benchmarks.gpu_check`): a time-boxed check of a GPU host.

Stages, in this order, each in its own subprocess:
  env      device, driver and library versions; copy bandwidth and fp16 matmul rate (ceilings)
  tests    the tests that need CUDA, through pytest (passes, failures and skips counted apart)
  kernels  the compiled Triton guided step vs its torch reference: error, latency, GB/s;
           registers and spills of the compiled kernels
  sd15     `lumen bench` rows of the SD1.5 UNet at 512x512, fp16, CFG 7.5, 30 steps
  sdxl     the same for the SDXL UNet at 1024x1024
  soak     200 graph-replayed requests: memory stays flat, one capture per key, no NaN
  serve    the step scheduler: per-step graphs vs the whole-loop graph at batch 1 (at most 2%
           slower), images/s with 1, 4 and 8 clients
  vae      SD's VAE decodes alike in fp16 and fp32; a force_upcast VAE decodes in fp32
A stage's time box is its share of what is left of the budget (shares are the stages' expected
seconds on a GPU host), so time a stage does not use passes to the stages after it, and a hung
CUDA call costs one stage, not the run: the stage is killed and recorded as "timeout" with what
it printed. DIR/gpu_check.json and DIR/gpu_check.md are rewritten after every stage, so a
killed run still leaves what it finished. --dry-run runs every stage on CPU at tiny sizes.
Exit status: 1 when a check failed or a stage crashed or timed out (a skip is not a failure).

Test hook: LUMEN_GPU_CHECK_HANG=NAME makes stage NAME sleep instead of running, so the time box
can be exercised.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from lumen.engine.errors import LumenError
from lumen.engine.validation import check_choice, check_real

from . import gpu_models, gpu_serve, gpu_stages
from .ablation import Settings
from .bench_kernels import CASES, Case

ROOT = Path(__file__).resolve().parents[1]  # the repository: stages run from here
HANG_ENV = "LUMEN_GPU_CHECK_HANG"
RESERVE_S = 5.0  # kept back from the time boxes for killing a stage and writing the reports
FAILED = ("fail", "error", "timeout")


@dataclass(frozen=True)
class Sizes:
    """What the stages run: the GPU host's sizes, or tiny ones for a CPU dry run."""

    device: str  # "cuda" or "cpu"
    copy_mib: int  # size of the device-to-device copy (bandwidth ceiling)
    matmul_n: int  # n of the n x n @ n x n matmul (compute ceiling)
    reps: int  # timed repetitions per figure (median)
    tests: tuple[str, ...]  # pytest arguments: the tests that need CUDA
    tests_may_skip: bool  # on CPU they skip; on the GPU host a skip means it was not checked
    kernel_cases: tuple[Case, ...]  # latent shapes of the guided step comparison
    aot_arch: int | None  # kernels.aot.compile_set(arch): None compiles for this device
    stage_env: dict  # {stage: {variable: value}} set in that stage's process
    sd15: Settings
    sdxl: Settings | None
    sdxl_skip: str  # why sdxl is None
    bench_tol: float  # max |x0 - x0 of the eager row| of the Lumen rows
    diffusers_tol: float | None  # the same for the diffusers row; None: recorded, not checked
    soak_runs: int
    soak_sizes: tuple[tuple[int, int], ...]  # latent (height, width): presets have no VAE
    soak_steps: int
    soak_dtype: str  # the dtype engine.build picks on this device
    serve_reps: int  # timed requests per figure of the serve stage (median)
    serve_jobs: int  # requests per client in the serve stage's throughput runs
    vae: dict  # AutoencoderKL config
    vae_latent: tuple[int, int, int, int]
    vae_tol: float  # max |fp16 image - fp32 image|, images in [0, 1]


SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512,
              scaling_factor=0.18215)
TINY_VAE = dict(SD_VAE, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                layers_per_block=1, sample_size=64)
BENCH = dict(batch=1, guidance=7.5, dtype="float16", steps=30, iters=3)

REAL = Sizes(
    device="cuda", copy_mib=2048, matmul_n=8192, reps=20,
    tests=("tests/test_cuda.py", "tests/test_kernels.py", "tests/test_engine_kernels.py",
           "-k", "test_cuda or test_engine_with_kernels"),
    tests_may_skip=False, kernel_cases=(CASES["sd15"], CASES["sdxl"]), aot_arch=None,
    stage_env={"kernels": {"LUMEN_KERNELS": "auto"}},
    sd15=Settings(model="sd15", height=512, width=512, **BENCH),
    sdxl=Settings(model="sdxl", height=1024, width=1024, **BENCH), sdxl_skip="",
    # fp16 UNets: the fast rows' kernels (fused step, inductor, cuBLAS choices) round
    # differently, and 30 UNet calls carry it on; diffusers' row also keeps its latents in fp16
    # and steps t - T // S, which is not the trailing list at S = 30.
    bench_tol=2e-2, diffusers_tol=None,
    soak_runs=200, soak_sizes=((32, 32), (64, 64)), soak_steps=10,
    soak_dtype="float16", serve_reps=5, serve_jobs=2, vae=SD_VAE, vae_latent=(1, 4, 64, 64), vae_tol=1e-2)

DRY = Sizes(
    device="cpu", copy_mib=16, matmul_n=256, reps=3,
    tests=("tests/test_cuda.py", "tests/test_kernels.py",
           "-k", "test_cuda or test_use_triton_is_false_for_cpu_tensors_by_default"),
    tests_may_skip=True,
    kernel_cases=(Case("2x4x8x8", 2, 4, 8, 8), Case("1x4x12x20", 1, 4, 12, 20)), aot_arch=90,
    stage_env={"kernels": {"TRITON_INTERPRET": "1", "LUMEN_KERNELS": "triton"}},
    sd15=Settings(model="small", height=64, width=64, batch=1, guidance=7.5, steps=2, iters=1),
    sdxl=Settings(model="small_xl", height=64, width=64, batch=1, guidance=7.5, steps=2,
                  iters=1), sdxl_skip="",
    bench_tol=1e-4, diffusers_tol=1e-4,  # fp32, and 2 steps divide T: the same timesteps
    soak_runs=5, soak_sizes=((8, 8), (16, 8)), soak_steps=2,
    soak_dtype="float32", serve_reps=1, serve_jobs=1, vae=TINY_VAE, vae_latent=(1, 4, 8, 8), vae_tol=1e-2)


class Stage(NamedTuple):
    name: str
    run: Callable[[Sizes, Path], dict]  # -> {"headline", "figures", "checks"} or {"skip"}
    share: float  # expected seconds on a GPU host: its part of the budget


STAGES = (Stage("env", gpu_stages.env, 20), Stage("tests", gpu_stages.tests, 80),
          Stage("kernels", gpu_stages.kernels_stage, 60), Stage("sd15", gpu_models.sd15, 120),
          Stage("sdxl", gpu_models.sdxl, 140), Stage("soak", gpu_models.soak, 40),
          Stage("serve", gpu_serve.serve, 60), Stage("vae", gpu_models.vae, 20))
STAGE_NAMES = tuple(s.name for s in STAGES)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, .md and logs")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock seconds for the whole run (default 480)")
    parser.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                        help=f"stages to run, in the fixed order ({', '.join(STAGE_NAMES)}; "
                             "default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on CPU at tiny sizes (CI runs this)")
    parser.add_argument("--run-stage", default=None, metavar="STAGE",
                        help="run one stage in this process and write DIR/stage-STAGE.json "
                             "(the driver runs each stage this way)")


def run(args) -> int:
    out = Path(args.out).resolve()
    if args.run_stage is not None:
        check_choice("--run-stage", args.run_stage, STAGE_NAMES)
        return run_stage(args.run_stage, out, args.dry_run)
    check_real("--budget-s", args.budget_s, 0.0, float("inf"), low_open=True)
    for name in args.stages or ():
        check_choice("stage", name, STAGE_NAMES)
    stages = [s for s in STAGES if args.stages is None or s.name in args.stages]
    return drive(stages, out, args.budget_s, args.dry_run, command_line(args, out))


def command_line(args, out: Path) -> str:
    words = ["python", "-m", "lumen.benchmarks.gpu_check", "--out", str(out),
             "--budget-s", f"{args.budget_s:g}"]
    words += ["--stages", *args.stages] if args.stages else []
    return shlex.join(words + (["--dry-run"] if args.dry_run else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lumen.benchmarks.gpu_check",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LumenError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
# The driver (parent process)


def drive(stages: list[Stage], out: Path, budget_s: float, dry_run: bool, command: str) -> int:
    """Run the stages one after another inside the budget; reports rewritten after each."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY if dry_run else REAL
    report = dict(command=command, device="cpu (dry run)" if dry_run else "unknown",
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                  budget_s=budget_s, stages=[])
    deadline = time.monotonic() + budget_s
    for i, stage in enumerate(stages):
        left = deadline - time.monotonic() - RESERVE_S
        box = left * stage.share / sum(s.share for s in stages[i:])
        record = run_child(stage.name, out, dry_run, sizes, box)
        report["stages"].append(record)
        if stage.name == "env" and record["figures"].get("device"):
            report["device"] = record["figures"]["device"]
        write_reports(out, report)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    print(summary(report["stages"]))
    return 1 if any(r["status"] in FAILED for r in report["stages"]) else 0


def run_child(name: str, out: Path, dry_run: bool, sizes: Sizes, box: float) -> dict:
    """One stage in its own process group, killed with its children when its box ends."""
    if box < 1:
        return stage_record(name, "timeout", 0.0, "not started: the budget was spent")
    result = out / f"stage-{name}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "lumen.benchmarks.gpu_check", "--run-stage", name,
               "--out", str(out)] + (["--dry-run"] if dry_run else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **sizes.stage_env.get(name, {}))
    print(f"[{name}] started, time box {box:.0f} s", flush=True)
    start = time.monotonic()
    log_path = out / f"stage-{name}.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        copier = threading.Thread(target=copy_lines, args=(child.stdout, log, name), daemon=True)
        copier.start()
        timed_out = wait_or_kill(child, box)
        copier.join(timeout=5)
    seconds, tail = time.monotonic() - start, log_tail(log_path)
    if timed_out:
        return stage_record(name, "timeout", seconds, f"killed after its {box:.0f} s time box",
                            log_tail=tail)
    if not result.exists():
        return stage_record(name, "error", seconds, f"exited with status {child.returncode} "
                            "before writing its result", log_tail=tail)
    record = json.loads(result.read_text())
    return dict(record, seconds=round(seconds, 1), log_tail=tail)


def wait_or_kill(child: subprocess.Popen, seconds: float) -> bool:
    """Whether child ran past `seconds`; if so its whole process group is killed."""
    try:
        child.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # a hung CUDA call ignores gentler signals
        child.wait()
        return True


def copy_lines(stream, log, name: str) -> None:
    """A child's output into its log file, and onto this console prefixed by the stage."""
    for line in stream:
        log.write(line)
        log.flush()
        print(f"[{name}] {line}", end="", flush=True)


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stage_record(name, status, seconds, headline, checks=(), figures=None, log_tail="") -> dict:
    """A stage's entry in gpu_check.json (the key order of the file)."""
    return dict(name=name, status=status, seconds=round(seconds, 1), headline=headline,
                checks=list(checks), figures=figures or {}, log_tail=log_tail)


# ---------------------------------------------------------------------------------------------
# One stage (child process)


def run_stage(name: str, out: Path, dry_run: bool) -> int:
    """Run one stage here and write DIR/stage-NAME.json; its status follows from its checks."""
    if os.environ.get(HANG_ENV) == name:
        print(f"{HANG_ENV}={name}: sleeping instead of running (test hook)", flush=True)
        time.sleep(24 * 3600)
    stage = STAGES[STAGE_NAMES.index(name)]
    start = time.monotonic()
    try:
        result = stage.run(DRY if dry_run else REAL, out)
        status = ("skip" if "skip" in result else
                  "fail" if any(not c["ok"] for c in result["checks"]) else "pass")
        record = stage_record(name, status, time.monotonic() - start,
                              result.get("skip") or result["headline"],
                              result.get("checks", ()), result.get("figures"))
    except Exception as err:  # the record says what broke; the log keeps the traceback
        traceback.print_exc()
        record = stage_record(name, "error", time.monotonic() - start, error_headline(err))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"stage-{name}.json").write_text(json.dumps(record, indent=1))
    print(f"{name}: {record['status']}: {record['headline']}", flush=True)
    return 0


def error_headline(err: Exception) -> str:
    if isinstance(err, ModuleNotFoundError) and err.name:
        package = err.name.split(".")[0]
        hint = " (carry its wheel: see benchmarks/README.md)" if package == "diffusers" else ""
        return f"{package} not installed{hint}"
    return f"{type(err).__name__}: {err}"[:300]


# ---------------------------------------------------------------------------------------------
# Reports


def summary(records: list[dict]) -> str:
    """Fixed-width table: stage, status, seconds, headline."""
    lines = [f"{'stage':8s} {'status':8s} {'seconds':>8s}  headline"]
    lines += [f"{r['name']:8s} {r['status']:8s} {r['seconds']:8.1f}  {r['headline']}"
              for r in records]
    return "\n".join(lines)


def write_reports(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    """The table, then each stage's checks, and the log tail of stages that did not pass."""
    lines = ["# GPU check", "", f"`{report['command']}`", "",
             f"Device: {report['device']}. Started {report['started']}, budget "
             f"{report['budget_s']:g} s.", "", "| stage | status | seconds | headline |",
             "|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['headline']} |"
              for r in report["stages"]]
    for r in report["stages"]:
        lines += ["", f"## {r['name']}: {r['status']}", ""]
        lines += [f"- {'pass' if c['ok'] else 'FAIL'}: {c['name']}: {c['detail']}"
                  for c in r["checks"]]
        if r["status"] in FAILED and r["log_tail"]:
            lines += ["", "```", r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
