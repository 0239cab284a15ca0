"""Fused step kernels (kernels/) against their torch references (engine guidance, prediction, DDIM).

Without CUDA the Triton kernels run on CPU tensors under the interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports `kernels`, and LUMEN_KERNELS=triton selects them.
triton itself may already be imported (diffusers imports it); kernels/_common.tile_sum keeps
that working.
Tolerances: kernel and reference both compute in fp32 from the same inputs (fp16/bf16 model
outputs are upcast exactly), so they differ only by summation order in the std and rounding:
atol = rtol = 1e-5 for every input dtype; the elementwise parts are compared bit for bit where the
operation order is the same (phi = 0, abar = 0, cfg=False).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton", reason="the kernel tests need triton (CPU: its interpreter)")

from lumen import kernels  # noqa: E402
from lumen.engine.config import SamplerConfig  # noqa: E402
from lumen.engine.errors import InvalidInputError, InvalidTypeError  # noqa: E402
from lumen.engine.guidance import guide  # noqa: E402
from lumen.engine.samplers import plan_ddim, step_schedule  # noqa: E402
from lumen.kernels import _common  # noqa: E402
from lumen.kernels.cfg_rescale import cfg_rescale_reference  # noqa: E402
from lumen.kernels.sampler_update import (ddim_update, ddim_update_reference, x0_eps,  # noqa: E402
                                    x0_eps_reference)

DEVICE = "cuda" if CUDA else "cpu"
TOL = dict(atol=1e-5, rtol=1e-5)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTIONS = ("v_prediction", "epsilon", "sample")
# Irregular shapes (odd C, H, W; batch 1..5) so every tile mask and stride path is exercised.
SHAPES = ((1, 3, 5, 7), (2, 5, 9, 13), (3, 4, 17, 11), (5, 1, 7, 3), (4, 7, 3, 31))
requires_cuda = pytest.mark.skipif(not CUDA, reason="compiled Triton kernels need a CUDA device; "
                                   "without one this file runs them under TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Force the Triton path, also for CPU tensors under the interpreter."""
    monkeypatch.setenv("LUMEN_KERNELS", "triton")


def scalar(v):
    return torch.tensor(v, dtype=torch.float32, device=DEVICE)


def ddim_plan(num_steps=10, eta=0.0):
    """Device DDIM plan on the zero-SNR schedule of SamplerConfig() (via its train_abar())."""
    t, abar = step_schedule(SamplerConfig(), num_steps)
    assert abar[0] == 0  # trailing spacing starts at T-1: zero terminal SNR
    return plan_ddim(t, abar, eta).to(DEVICE)


def step_inputs(shape, dtype, cfg, seed=0):
    """m (model dtype; [neg, pos] when cfg), x and noise_i (fp32), for a [B, C, H, W] shape."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    m = torch.randn((2 * B if cfg else B,) + shape[1:], generator=g)
    x, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return m.to(DEVICE, dtype), x.to(DEVICE), z.to(DEVICE)


def step_scalars(plan, i, w=7.5, phi=0.7):
    return dict(a_t=plan.a[i], s_t=plan.s[i], coef_i=plan.coef[i], guidance_scale=scalar(w),
                guidance_rescale=scalar(phi))


def cfg_rescale(m, w, phi):
    """The guided model output through the production kernel: for "sample", x0 is the guided m."""
    x = torch.zeros(m[m.shape[0] // 2:].shape, dtype=torch.float32, device=m.device)
    return kernels.guided_x0_eps_triton(m, x, scalar(0.0), scalar(1.0), w, phi, "sample", True)[0]


def run_both(fn, ref, *args, **kwargs):
    return fn(*args, **kwargs), ref(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Kernel == reference


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_step_matches_reference(dtype, prediction_type, cfg):
    shape = SHAPES[(DTYPES.index(dtype) + PREDICTIONS.index(prediction_type)) % len(SHAPES)]
    m, x, z = step_inputs(shape, dtype, cfg)
    plan = ddim_plan(10, eta=0.5)
    sc = step_scalars(plan, 4)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                        sc["a_t"], sc["s_t"], sc["coef_i"], sc["guidance_scale"],
                        sc["guidance_rescale"], prediction_type, cfg)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL)
    assert not torch.equal(out, x)  # the step moved the state


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_guided_x0_eps_matches_reference(dtype, prediction_type):
    m, x, _ = step_inputs(SHAPES[2], dtype, cfg=True, seed=1)
    sc = step_scalars(ddim_plan(), 3)
    args = (m, x, sc["a_t"], sc["s_t"], sc["guidance_scale"], sc["guidance_rescale"],
            prediction_type, True)
    (x0, eps), (x0_ref, eps_ref) = run_both(kernels.guided_x0_eps_triton,
                                            kernels.guided_x0_eps_reference, *args)
    torch.testing.assert_close(x0, x0_ref, **TOL)
    torch.testing.assert_close(eps, eps_ref, **TOL)


def test_public_entry_points_dispatch_to_triton_and_reference(monkeypatch):
    m, x, z = step_inputs(SHAPES[1], torch.float16, cfg=True)
    sc = step_scalars(ddim_plan(), 2)
    args = (m, x, z, *sc.values(), "v_prediction", True)
    assert kernels.use_triton(x)
    torch.testing.assert_close(kernels.guided_step(*args), kernels.guided_step_reference(*args),
                               **TOL)
    monkeypatch.setenv("LUMEN_KERNELS", "reference")
    assert not kernels.use_triton(x)
    assert torch.equal(kernels.guided_step(*args), kernels.guided_step_reference(*args))


def test_use_triton_is_false_for_cpu_tensors_by_default(monkeypatch):
    monkeypatch.setenv("LUMEN_KERNELS", "auto")
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("LUMEN_KERNELS", "fast")
    with pytest.raises(InvalidInputError, match="LUMEN_KERNELS='fast'"):
        kernels.use_triton(torch.zeros(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cfg_rescale_matches_guide(dtype):
    m, _, _ = step_inputs(SHAPES[4], dtype, cfg=True, seed=2)
    w, phi = scalar(5.0), scalar(0.7)
    out, ref = run_both(cfg_rescale, cfg_rescale_reference, m, w, phi)
    torch.testing.assert_close(out, ref, **TOL)


def test_multi_tile_chunks_merge_like_one_pass(monkeypatch):
    # Two chunks per sample force several tiles per chunk: Chan merges inside and across chunks.
    monkeypatch.setattr(_common, "MAX_CHUNKS", 2)
    m, x, z = step_inputs((2, 3, 37, 41), torch.float32, cfg=True, seed=3)  # 4551 = 5 tiles
    assert _common.Walk(x).iters == 4 and _common.Walk(x).chunks == 2
    sc = step_scalars(ddim_plan(), 5)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                        *sc.values(), "v_prediction", True)
    torch.testing.assert_close(out, ref, **TOL)


def test_rescale_std_survives_a_large_mean():
    # E[x^2] - E[x]^2 in fp32 would lose the 1e-2 spread under a 300 offset; Chan's merge keeps it.
    g = torch.Generator().manual_seed(4)
    m = (300 + 1e-2 * torch.randn(4, 3, 19, 23, generator=g, dtype=torch.float64))
    w, phi = 3.0, 1.0
    exact = guide(*m.float().double().chunk(2), w, phi)  # float64 from the same fp32 inputs
    out = cfg_rescale(m.float().to(DEVICE), scalar(w), scalar(phi))
    torch.testing.assert_close(out.double().cpu(), exact, atol=3e-5, rtol=0)  # out ~ 80


# ---------------------------------------------------------------------------------------------
# Guidance properties (docs/math.md#cfg-with-per-sample-rescale)


def test_rescale_is_per_sample():
    m, x, z = step_inputs(SHAPES[2], torch.float32, cfg=True, seed=5)  # B = 3
    sc = step_scalars(ddim_plan(), 1)
    before = kernels.guided_step_triton(m, x, z, *sc.values(), "v_prediction", True)
    m2 = m.clone()
    m2[1] *= 10  # neg of sample 1
    m2[3 + 1] += 5  # pos of sample 1
    after = kernels.guided_step_triton(m2, x, z, *sc.values(), "v_prediction", True)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert (after[1] - before[1]).abs().max() > 1e-2


def test_constant_cfg_gives_finite_output():
    # Sample 0 has neg = pos = constant: sd_cfg = 0, so it must be left unrescaled, not NaN.
    m, x, z = step_inputs(SHAPES[1], torch.float16, cfg=True, seed=6)  # B = 2
    m[0], m[2] = 0.25, 0.25
    sc = step_scalars(ddim_plan(), 3)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                        *sc.values(), "v_prediction", True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL)
    g = cfg_rescale(m, sc["guidance_scale"], sc["guidance_rescale"])
    assert torch.equal(g[0], torch.full_like(g[0], 0.25))


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning",
                            r"ignore:std\(\). degrees of freedom:UserWarning")
def test_single_element_samples_are_left_unrescaled():
    # N = 1: the unbiased std is 0/0 = NaN for pos and cfg; the guard keeps plain CFG, as guide().
    m, x, z = step_inputs((3, 1, 1, 1), torch.float32, cfg=True, seed=17)
    sc = step_scalars(ddim_plan(), 3)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                        *sc.values(), "v_prediction", True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_phi_zero_is_plain_cfg_bit_for_bit(dtype):
    m, _, _ = step_inputs(SHAPES[3], dtype, cfg=True, seed=7)
    w = scalar(7.5)
    neg, pos = m.float().chunk(2)
    assert torch.equal(cfg_rescale(m, w, scalar(0.0)), neg + w * (pos - neg))


def test_w_one_with_rescale_leaves_pos():
    m, _, _ = step_inputs(SHAPES[1], torch.float32, cfg=True, seed=8)
    out = cfg_rescale(m, scalar(1.0), scalar(0.7))
    torch.testing.assert_close(out, m.chunk(2)[1], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sampler update (docs/math.md#from-model-output-to-x0-and-eps, docs/math.md#ddim)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_ddim_row_matches_reference(eta):
    plan = ddim_plan(10, eta)
    m, x, z = step_inputs((2, 3, 5, 7), torch.bfloat16, cfg=True, seed=9)
    for i in range(plan.plan.num_steps):  # abar_t = 0 first, abar_p = 1 last
        sc = step_scalars(plan, i)
        out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                            *sc.values(), "v_prediction", True)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, **TOL)


def test_first_step_at_abar_zero_gives_x0_minus_v_and_eps_x_exactly():
    plan = ddim_plan(10)
    assert plan.a[0] == 0 and plan.s[0] == 1
    m, x, z = step_inputs(SHAPES[2], torch.float16, cfg=False, seed=10)
    x0, eps = kernels.guided_x0_eps_triton(m, x, plan.a[0], plan.s[0], scalar(7.5), scalar(0.7),
                                           "v_prediction", False)
    assert torch.equal(x0, -m.float()) and torch.equal(eps, x)
    # eta = 0 from pure noise (docs/math.md#ddim): x_p = sqrt(abar_p)*(-v) + sqrt(1 - abar_p)*x_T.
    out = ddim_update(m, x, z, plan.a[0], plan.s[0], plan.coef[0], "v_prediction")
    c = plan.coef[0]
    assert c[2] == 0
    torch.testing.assert_close(out, c[0] * -m.float() + c[1] * x, atol=0, rtol=0)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_sampler_update_alone_is_bitwise_reference(prediction_type):
    # No reduction, same operation order: the unguided kernels equal the reference exactly.
    m, x, z = step_inputs(SHAPES[0], torch.float32, cfg=False, seed=11)
    plan = ddim_plan(10, eta=1.0)
    i = 5
    out, ref = run_both(ddim_update, ddim_update_reference, m, x, z, plan.a[i], plan.s[i],
                        plan.coef[i], prediction_type)
    (x0, eps), (x0_ref, eps_ref) = run_both(x0_eps, x0_eps_reference, m, x, plan.a[i],
                                            plan.s[i], prediction_type)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close((x0, eps), (x0_ref, eps_ref), **TOL)
    if not CUDA:  # numpy rounds each op like torch; CUDA may differ by an ulp in div/sqrt
        assert torch.equal(out, ref) and torch.equal(x0, x0_ref) and torch.equal(eps, eps_ref)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_v_model_lands_on_x0(eta):
    """The oracle test through the fused kernels: a model returning the exact v recovers x0*."""
    S, shape = 7, (2, 3, 5, 9)
    plan = ddim_plan(S, eta)
    g = torch.Generator().manual_seed(12)
    x0_star = torch.randn(shape, generator=g).to(DEVICE)
    noise = torch.randn((shape[0], S) + shape[1:], generator=g).to(DEVICE)  # [B, S, C, H, W]
    x = torch.randn(shape, generator=g).to(DEVICE)
    w, phi = scalar(7.5), scalar(0.7)
    for i in range(S):
        a, s = plan.a[i], plan.s[i]
        eps = (x - a * x0_star) / s
        v = a * eps - s * x0_star
        x = kernels.guided_step_triton(torch.cat([v, v]), x, noise[:, i], a, s, plan.coef[i],
                                       w, phi, "v_prediction", True)
    torch.testing.assert_close(x, x0_star, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("layout", ["channels_last", "mixed"])
def test_channels_last_inputs(layout):
    m, x, z = step_inputs(SHAPES[1], torch.float16, cfg=True, seed=13)
    cl = torch.channels_last
    m = m.contiguous(memory_format=cl)
    if layout == "channels_last":
        x, z = x.contiguous(memory_format=cl), z.contiguous(memory_format=cl)
    sc = step_scalars(ddim_plan(10, eta=1.0), 6)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, z,
                        *sc.values(), "v_prediction", True)
    torch.testing.assert_close(out, ref, **TOL)
    assert out.is_contiguous(memory_format=cl) == (layout == "channels_last")


def test_strided_noise_view_and_non_dense_model_output():
    B, S, C, H, W = 3, 4, 3, 7, 9
    g = torch.Generator().manual_seed(14)
    noise = torch.randn(B, S, C, H, W, generator=g).to(DEVICE)
    m_wide = torch.randn(2 * B, C, H, 2 * W, generator=g).to(DEVICE)
    m = m_wide[..., ::2]  # non-dense: every offset goes through the strides
    x = torch.randn(B, C, H, W, generator=g).to(DEVICE)
    sc = step_scalars(ddim_plan(S, eta=1.0), 2)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x,
                        noise[:, 2], *sc.values(), "sample", True)
    torch.testing.assert_close(out, ref, **TOL)


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad_calls():
    m, x, z = step_inputs((2, 3, 5, 7), torch.float16, cfg=True)
    sc = step_scalars(ddim_plan(), 1)
    good = dict(m=m, x=x, noise_i=z, **sc, prediction_type="v_prediction", cfg=True)
    return [
        (dict(m=m.double()), InvalidTypeError, "m.dtype=torch.float64"),
        (dict(m=m[:2]), InvalidInputError, r"m.shape=\(2, 3, 5, 7\); expected \(4, 3, 5, 7\)"),
        (dict(cfg=False), InvalidInputError, r"m.shape=\(4, 3, 5, 7\); expected \(2, 3, 5, 7\)"),
        (dict(x=x.half()), InvalidTypeError, "x.dtype=torch.float16"),
        (dict(x=x[0]), InvalidInputError, r"x.shape=\(3, 5, 7\); expected non-empty"),
        (dict(noise_i=z[:, :2]), InvalidInputError, r"noise_i.shape=\(2, 2, 5, 7\)"),
        (dict(a_t=0.5), InvalidTypeError, "a_t of type float; expected a torch.Tensor"),
        (dict(s_t=sc["s_t"][None]), InvalidInputError, r"s_t.shape=\(1,\); expected \(\)"),
        (dict(coef_i=sc["coef_i"][:2]), InvalidInputError, r"coef_i.shape=\(2,\)"),
        (dict(guidance_scale=scalar(7.5).half()), InvalidTypeError, "guidance_scale.dtype"),
        (dict(prediction_type="flow"), InvalidInputError, "prediction_type='flow'"),
        (dict(cfg=1), InvalidTypeError, "cfg=1 of type int; expected bool"),
    ], good


@pytest.mark.parametrize("case", range(12))
@pytest.mark.parametrize("entry", ["guided_step", "guided_step_triton"])
def test_bad_input_raises(entry, case):
    bad_calls, good = _bad_calls()
    change, error, message = bad_calls[case]
    with pytest.raises(error, match=message):
        getattr(kernels, entry)(**{**good, **change})


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRETED", False)
    m, x, z = step_inputs((1, 3, 5, 7), torch.float32, cfg=False)
    sc = step_scalars(ddim_plan(), 1)
    with pytest.raises(InvalidInputError, match="x on cpu; expected a CUDA tensor"):
        kernels.guided_step_triton(m.cpu(), x.cpu(), z.cpu(), *(t.cpu() for t in sc.values()),
                                   "v_prediction", False)


# ---------------------------------------------------------------------------------------------
# Compiled kernels on CUDA


@requires_cuda
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (2, 4, 128, 128), (3, 16, 129, 127)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_guided_step_matches_reference(shape, dtype):
    m, x, z = step_inputs(shape, dtype, cfg=True, seed=15)
    sc = step_scalars(ddim_plan(25, eta=1.0), 3)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        m, x, z = (t.contiguous(memory_format=memory_format) for t in (m, x, z))
        out, ref = run_both(kernels.guided_step, kernels.guided_step_reference, m, x, z,
                            *sc.values(), "v_prediction", True)
        torch.testing.assert_close(out, ref, **TOL)


@requires_cuda
def test_cuda_graph_replays_new_device_scalars():
    """w, phi, a_t, s_t and coef are read on the device: a captured step replays new values."""
    m, x, z = step_inputs((2, 4, 64, 64), torch.float16, cfg=True, seed=16)
    plan = ddim_plan(10, eta=1.0)
    sc = {k: v.clone() for k, v in step_scalars(plan, 2).items()}
    kernels.guided_step(m, x, z, *sc.values(), "v_prediction", True)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.guided_step(m, x, z, *sc.values(), "v_prediction", True)
    for key, value in step_scalars(plan, 5, w=3.0, phi=0.3).items():
        sc[key].copy_(value)
    graph.replay()
    ref = kernels.guided_step_reference(m, x, z, *sc.values(), "v_prediction", True)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("cfg", [True, False])
def test_step_without_noise_matches_reference_and_zero_noise(cfg):
    """noise_i=None (a plan that draws none) leaves the noise term out: same as sigma*0."""
    m, x, _ = step_inputs(SHAPES[1], torch.float16, cfg, seed=18)
    sc = step_scalars(ddim_plan(10, eta=0.0), 4)
    args = (sc["a_t"], sc["s_t"], sc["coef_i"], sc["guidance_scale"], sc["guidance_rescale"],
            "v_prediction", cfg)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, m, x, None, *args)
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.equal(out, kernels.guided_step_triton(m, x, torch.zeros_like(x), *args))


def test_samples_too_large_to_address_are_refused():
    x = torch.zeros(()).expand(1, 1, 2**15, 2**15 + 1)  # 2^30 + 2^15 elements, no memory
    with pytest.raises(InvalidInputError, match=r"x.shape=\(1, 1, 32768, 32769\).*at most"):
        _common.Walk(x)


# ---------------------------------------------------------------------------------------------
# Per-sample scalars (the step scheduler: every sample at its own step, with its own guidance)


def per_sample_scalars(B, eta=1.0):
    """Sample b at its own step (never the first: a = 0 there) of its own plan (10 or 7 steps),
    with its own w and phi."""
    plans = [ddim_plan(10 if b % 2 == 0 else 7, eta) for b in range(B)]
    rows = [step_scalars(p, 1 + (2 * b) % (p.plan.num_steps - 1), w=2.0 + b, phi=0.25 * (b % 4))
            for b, p in enumerate(plans)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}, rows


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_per_sample_scalars_match_each_sample_run_alone(prediction_type, cfg):
    """Per-sample a, s, coef, w and phi: kernel == reference, and sample b equals the shared-scalar
    step of sample b alone (bit for bit in the reference, 1e-5 in the kernel's std merge)."""
    shape = SHAPES[4]
    m, x, z = step_inputs(shape, torch.float16, cfg, seed=21)
    batched, rows = per_sample_scalars(shape[0])
    args = (m, x, z, *batched.values(), prediction_type, cfg)
    out, ref = run_both(kernels.guided_step_triton, kernels.guided_step_reference, *args)
    torch.testing.assert_close(out, ref, **TOL)
    x0, x0_ref = run_both(kernels.guided_x0_eps_triton, kernels.guided_x0_eps_reference, m, x,
                          batched["a_t"], batched["s_t"], batched["guidance_scale"],
                          batched["guidance_rescale"], prediction_type, cfg)
    torch.testing.assert_close(x0, x0_ref, **TOL)
    for b, row in enumerate(rows):
        m_b = torch.stack([m[b], m[shape[0] + b]]) if cfg else m[b:b + 1]
        alone = kernels.guided_step_reference(m_b, x[b:b + 1], z[b:b + 1], *row.values(),
                                              prediction_type, cfg)
        assert torch.equal(ref[b:b + 1], alone)
        torch.testing.assert_close(out[b:b + 1], alone, **TOL)


def test_per_sample_scalars_must_all_be_per_sample():
    m, x, z = step_inputs((2, 3, 5, 7), torch.float32, cfg=True)
    batched, _ = per_sample_scalars(2)
    mixed = {**batched, "s_t": batched["s_t"][0]}
    with pytest.raises(InvalidInputError, match=r"s_t.shape=\(\); expected \(2,\)"):
        kernels.guided_step(m, x, z, *mixed.values(), "v_prediction", True)
    with pytest.raises(InvalidInputError, match=r"coef_i.shape=\(3, 3\); expected \(3,\) \(shared\) "
                                                r"or \(2, 3\) \(per sample\)"):
        kernels.guided_step(m, x, z, *{**batched, "coef_i": torch.zeros(3, 3)}.values(),
                            "v_prediction", True)
