"""`python -m lumen.benchmarks.gpu_check --dry-run`: every stage on CPU, reports, time boxes, exit codes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lumen.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 960  # the dry run's budget: the kernels stage's box is ~13% of it


def gpu_check_run(out: Path, *args, hang: str | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it (without the test session's TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LUMEN_KERNELS")}
    if hang:
        env[gpu_check.HANG_ENV] = hang
    return subprocess.run([sys.executable, "-m", "lumen.benchmarks.gpu_check", "--out", str(out),
                           "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # A cap, not the run's length (~80 s here): the kernels stage compiles its 171 sm_90 variants
    # in ~60 s with a cold Triton cache (measured), so its share of 400 s (53 s) was too short
    done = gpu_check_run(out, "--budget-s", str(BUDGET_S))
    report = json.loads((out / "gpu_check.json").read_text())
    return done, report, {s["name"]: s for s in report["stages"]}, out


def test_dry_run_passes_and_reports_every_stage_in_order(dry_run):
    done, report, stages, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s["name"] for s in report["stages"]] == list(gpu_check.STAGE_NAMES)
    assert report["budget_s"] == BUDGET_S and "--dry-run" in report["command"]
    for s in report["stages"]:
        assert s["status"] in ("pass", "skip"), s
        assert set(s) >= {"name", "status", "seconds", "headline", "checks", "figures",
                          "log_tail"}
    assert stages["sdxl"]["status"] == "pass"  # the small_xl preset: SDXL's added conditioning
    markdown = (out / "gpu_check.md").read_text()
    for name in gpu_check.STAGE_NAMES:
        assert f"| {name} | {stages[name]['status']} |" in markdown
    summary = done.stdout.splitlines()[-len(stages):]  # the table is printed last
    assert [line.split()[:2] for line in summary] == [[s["name"], s["status"]]
                                                      for s in report["stages"]]


def test_env_measures_both_ceilings_on_cpu(dry_run):
    env = dry_run[2]["env"]["figures"]
    assert env["device"].startswith("cpu") and env["copy_gbps"] > 0 and env["matmul_tflops"] > 0
    assert env["torch"] != "absent" and env["diffusers"] != "absent"


def test_skipped_tests_are_counted_apart_from_passes(dry_run):
    tests = dry_run[2]["tests"]["figures"]
    assert tests["counts"]["pass"] >= 1 and tests["counts"]["skip"] >= 1
    assert tests["counts"].get("fail", 0) == 0
    skipped = [t for t in tests["tests"] if t["outcome"] == "skip"]
    assert skipped and all("CUDA" in t["message"] for t in skipped)


def test_interpreted_kernel_matches_its_reference(dry_run):
    kernels = dry_run[2]["kernels"]["figures"]
    assert len(kernels["steps"]) == 8  # 2 shapes x fp16, bf16 x CFG on, off
    for row in kernels["steps"]:
        assert row["max_abs_err"] < 1e-5 and row["within_tol"]
        assert row["fused_us"] > 0 and row["eager_us"] > 0 and row["gbps"] > 0
    assert kernels["copy_from"] == "env stage"
    registers = kernels["registers"]
    if registers["available"]:
        assert all(v["ok"] and v["n_regs"] > 0 for v in registers["variants"])


def test_bench_rows_are_measured_and_match_the_eager_row(dry_run):
    rows = {r["row"]: r for r in dry_run[2]["sd15"]["figures"]["rows"]}
    for name in ("diffusers", "eager", "floor:eager"):
        assert rows[name]["it_per_s"] > 0
    assert rows["diffusers"]["max_diff"] < 1e-4 and rows["eager"]["max_diff"] == 0
    assert "needs CUDA" in rows["fused"]["skipped"]


def test_soak_has_no_nan_and_no_captures_without_cuda(dry_run):
    soak = dry_run[2]["soak"]["figures"]
    assert soak["runs"] == 5 and soak["nonfinite_runs"] == 0 and soak["keys"] == 2
    assert soak["cuda_graph"] is False and soak["captures"] == 0


def test_vae_decodes_alike_in_fp16_and_upcasts_when_asked(dry_run):
    vae = dry_run[2]["vae"]["figures"]
    assert vae["fp16_vs_fp32_max_abs"] < 1e-2
    assert vae["force_upcast_decoder_dtype"] == "float32"


def test_a_hung_stage_is_cut_off_and_later_stages_still_run(tmp_path):
    done = gpu_check_run(tmp_path, "--stages", "env", "vae", "--budget-s", "40", hang="env")
    assert done.returncode == 1
    stages = {s["name"]: s for s in json.loads((tmp_path / "gpu_check.json").read_text())["stages"]}
    assert stages["env"]["status"] == "timeout" and stages["env"]["seconds"] < 40
    assert "sleeping instead of running" in stages["env"]["log_tail"]
    assert stages["vae"]["status"] == "pass"
    assert "| env | timeout |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--stages", "env", "nope"], "stage='nope'; expected one of env, tests"),
    (["--budget-s", "0"], "--budget-s=0.0; expected a number in (0.0, inf]"),
    (["--budget-s", "-5"], "--budget-s=-5.0; expected"),
])
def test_bad_stages_and_budgets_are_refused(tmp_path, capsys, args, message):
    assert gpu_check.main(["--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_lumen_bench_gpu_reaches_the_check():
    import argparse

    from lumen.benchmarks.cli import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "gpu", "--out", "o", "--dry-run", "--stages", "env"])
    assert (args.func, args.out, args.dry_run, args.stages, args.budget_s) == (
        gpu_check.run, "o", True, ["env"], 480.0)
