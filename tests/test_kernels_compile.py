"""The step kernels compile for sm_90 (H100/H200) with no GPU present: ahead of time, in CI.

Triton's compiler and ptxas run here; `lumen.kernels.aot` drives the real launchers with an offline
driver and reads each cubin's registers and local memory. Runs in a subprocess: the test
session imports `kernels` under TRITON_INTERPRET=1, where the kernels are interpreted instead.
"""
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="compiling the kernels needs triton")

ROWS = (0, 1, 2, 3)  # plan rows: the scalars' addresses are 16-byte aligned only for row 0


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LUMEN_KERNELS")}
    code = ("import json, sys; from lumen.kernels.aot import compile_set; "
            f"json.dump(compile_set(90, rows={ROWS}), open(sys.argv[1], 'w'))")
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def by_kernel(records, name):
    return [r for r in records if r["kernel"] == name]


def test_every_variant_compiles_for_sm90_without_spills(records):
    assert records and all(r["arch"] == 90 for r in records)
    failed = [(r["kernel"], r["variant"], r["error"], r["n_spills"]) for r in records if not r["ok"]]
    assert failed == []
    assert all(r["n_spills"] == 0 and 0 < r["n_regs"] <= 255 for r in records)


def per_sample(record, name) -> bool:
    """Scalars read per sample: Triton specialises the stride 1 of a [B] operand as a constant."""
    return record["specialized"].get(name) == 1


def test_every_constexpr_combination_is_compiled_once(records):
    """One kernel per combination: scalar pointers at other alignments add no second copy.

    Shared scalars (stride 0) and per-sample ones (the step scheduler's, stride 1) are two
    specialisations of the same kernel; the per-sample set is compiled for dense tensors."""
    steps = by_kernel(records, "_step_kernel")
    got = sorted((r["pointers"]["m_ptr"], r["variant"]["PRED"], r["variant"]["CFG"],
                  r["variant"]["DENSE"], r["variant"]["X0_EPS"], r["variant"]["NOISE"],
                  per_sample(r, "sa_b")) for r in steps)
    modes = [(True, False), (False, False), (False, True)]  # (x0, eps); x_p; x_p with noise
    scalars = [(True, False), (False, False), (True, True)]  # (DENSE, per sample)
    want = sorted((dtype, pred, cfg, dense, x0_eps, noise, per)
                  for dtype, pred, cfg, (dense, per), (x0_eps, noise) in itertools.product(
                      ("*fp32", "*fp16", "*bf16"), (0, 1, 2), (True, False), scalars, modes))
    assert got == want
    stats = by_kernel(records, "_cfg_stats_kernel")
    assert sorted((r["pointers"]["m_ptr"], r["variant"]["DENSE"], per_sample(r, "sw_b"))
                  for r in stats) == sorted((dtype, *s) for dtype, s in itertools.product(
                      ("*fp32", "*fp16", "*bf16"), scalars))


def test_batch_offsets_are_int64(records):
    """b * stride in int32 wraps once a tensor has 2^31 elements: the program id is widened."""
    assert all(r["int64_batch_offset"] for r in records)


def test_no_approximate_division(records):
    """Plain `/` compiles to div.full.f32; the interpreter the CPU tests run divides exactly."""
    assert sum(r["approx_divisions"] for r in records) == 0
