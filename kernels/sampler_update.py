"""Model output -> (x0, eps) fused with the DDIM update, one launch.

The math: docs/math.md#from-model-output-to-x0-and-eps and docs/math.md#ddim.

x_p = c0*x0 + c1*eps + c2*z with (c0, c1, c2) = coef_i = (sqrt(abar_p), sqrt(1 - abar_p -
sigma^2), sigma) from engine.samplers.plan_ddim. a_t, s_t and coef_i are read from device
memory inside the kernel, so nothing on the host changes from step to step (graph capture).
The x0/eps variant feeds the other samplers (Euler, Heun, DPM-Solver++), which combine x0 and
eps with their own coefficients.
"""
import torch

from lumen.engine.prediction import to_x0_eps
from lumen.engine.samplers import ddim_update as ddim_update_line

from ._common import (BLOCK, PREDICTION_CODES, UNALIGNED_SCALARS, Walk, batch_index, check_device,
                      check_launchable, check_model_output, check_prediction_type, check_scalars,
                      check_tensor, per_sample, sample_stride, tile_offsets)
from ._triton import tl, triton
from .cfg_rescale import guided_tile, load_pair, rescale_ratio

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def x0_eps_tile(m, x, a, s, PRED: tl.constexpr):
    """engine.prediction.to_x0_eps on a tile, same operation order; PRED as PREDICTION_CODES."""
    if PRED == 0:  # v: never routed through eps, so abar = 0 gives x0 = -v, eps = x exactly
        x0 = a * x - s * m
        eps = a * m + s * x
    elif PRED == 1:  # epsilon; IEEE division (plain / may be approximate), broadcast by hand
        x0 = tl.div_rn(x - s * m, tl.broadcast_to(a, x.shape))
        eps = m
    else:  # sample
        x0 = m
        eps = tl.div_rn(x - a * m, tl.broadcast_to(s, x.shape))
    return x0, eps


@triton.jit
def write_step(m, x_ptr, z_ptr, out_ptr, eps_ptr, x_off, z_off, out_off, mask, a, s, c0, c1, c2,
               PRED: tl.constexpr, X0_EPS: tl.constexpr, NOISE: tl.constexpr):
    """Convert the model-output tile m at x_t; store x_p (or x0 and eps when X0_EPS).

    NOISE=False: the step draws no noise (sigma = 0), so z is neither passed nor read.
    """
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    x0, eps = x0_eps_tile(m, x, a, s, PRED)
    if X0_EPS:
        tl.store(out_ptr + out_off, x0, mask=mask)
        tl.store(eps_ptr + out_off, eps, mask=mask)
    elif NOISE:
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0)
        tl.store(out_ptr + out_off, c0 * x0 + c1 * eps + c2 * z, mask=mask)
    else:
        tl.store(out_ptr + out_off, c0 * x0 + c1 * eps, mask=mask)


@triton.jit
def load_coefs(a_ptr, s_ptr, coef_ptr, coef_stride, X0_EPS: tl.constexpr):
    """a_t, s_t and the DDIM row (c0, c1, c2) from device memory (row unused when X0_EPS)."""
    a, s = tl.load(a_ptr), tl.load(s_ptr)
    if X0_EPS:
        c0, c1, c2 = 0.0, 0.0, 0.0
    else:
        c0 = tl.load(coef_ptr)
        c1 = tl.load(coef_ptr + coef_stride)
        c2 = tl.load(coef_ptr + 2 * coef_stride)
    return a, s, c0, c1, c2


@triton.jit(do_not_specialize_on_alignment=UNALIGNED_SCALARS)
def _step_kernel(
    m_ptr,  # [B or 2B, C, H, W] model output ([neg, pos] when CFG), model dtype
    x_ptr,  # [B, C, H, W] fp32 state x_t
    z_ptr,  # [B, C, H, W] fp32 noise of this step (read only when NOISE)
    out_ptr,  # [B, C, H, W] fp32 out: x_p, or x0 when X0_EPS
    eps_ptr,  # [B, C, H, W] fp32 out: eps when X0_EPS (same strides as out)
    stats_ptr,  # [B, P, 4] fp32 from cfg_rescale._cfg_stats_kernel (CFG only)
    w_ptr, phi_ptr,  # 0-dim or [B] fp32 guidance scale and rescale (CFG only)
    a_ptr, s_ptr,  # 0-dim or [B] fp32 sqrt(abar_t), sqrt(1 - abar_t)
    coef_ptr, coef_stride,  # [3] or [B, 3] fp32 DDIM row (sqrt(abar_p), c_eps, sigma)
    sw_b, sphi_b, sa_b, ss_b, scoef_b,  # per-sample strides of w, phi, a, s, coef (0: shared)
    B, N, D2, D3, P,  # batch, elements per sample, walk sizes, chunks per sample
    sm_b, sm_1, sm_2, sm_3,  # m strides in walk order
    sx_b, sx_1, sx_2, sx_3,  # x strides
    sz_b, sz_1, sz_2, sz_3,  # z strides
    so_b, so_1, so_2, so_3,  # out (and eps) strides
    ITERS: tl.constexpr, BLOCK: tl.constexpr,  # tiles per chunk, elements per tile
    P_POW2: tl.constexpr,  # P rounded up to a power of two
    PRED: tl.constexpr,  # 0 v_prediction, 1 epsilon, 2 sample
    X0_EPS: tl.constexpr,  # write (x0, eps) instead of x_p
    DENSE: tl.constexpr,  # every tensor dense in walk order
    CFG: tl.constexpr,  # m is [neg, pos]: guide and rescale each tile first
    NOISE: tl.constexpr,  # the update adds sigma * z (DDIM with eta > 0)
):
    b = batch_index()
    p = tl.program_id(1)
    a, s, c0, c1, c2 = load_coefs(a_ptr + b * sa_b, s_ptr + b * ss_b, coef_ptr + b * scoef_b,
                                  coef_stride, X0_EPS)
    if CFG:
        w, phi = tl.load(w_ptr + b * sw_b), tl.load(phi_ptr + b * sphi_b)
        ratio = rescale_ratio(stats_ptr, b, P, N, ITERS * BLOCK, P_POW2)
    for it in range(ITERS):
        j = (p * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        if CFG:
            neg, pos = load_pair(m_ptr, b, B, j, mask, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)
            m = guided_tile(neg, pos, w, phi, ratio)
        else:
            m_off = tile_offsets(b, j, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)
            m = tl.load(m_ptr + m_off, mask=mask, other=0.0).to(tl.float32)
        write_step(m, x_ptr, z_ptr, out_ptr, eps_ptr,
                   tile_offsets(b, j, sx_b, sx_1, sx_2, sx_3, D2, D3, DENSE),
                   tile_offsets(b, j, sz_b, sz_1, sz_2, sz_3, D2, D3, DENSE),
                   tile_offsets(b, j, so_b, so_1, so_2, so_3, D2, D3, DENSE),
                   mask, a, s, c0, c1, c2, PRED, X0_EPS, NOISE)


# ---------------------------------------------------------------------------------------------
# Launchers


def check_step(m, x, noise_i, prediction_type, cfg, **scalars):
    """Checks shared by every launcher and entry point; raises InvalidInput/InvalidTypeError."""
    check_model_output(m, x, cfg)
    if noise_i is not None:
        check_tensor("noise_i", noise_i, (torch.float32,), x.shape)
        check_device("noise_i", noise_i, x)
    check_scalars(x, **scalars)
    check_prediction_type(prediction_type)


def step_operands(x, noise_i, a_t, coef_i, walk: Walk):
    """(out, eps, z, coef, coef_stride) of a step launch; outputs fp32, dense in x's order.

    coef_i None selects the (x0, eps) variant, noise_i None an update without noise: the
    operands they would fill are then placeholders that the kernel never reads.
    """
    out = walk.empty(x)
    if coef_i is None:
        return out, walk.empty(x), x, a_t, 0
    return out, out, x if noise_i is None else noise_i, coef_i, coef_i.stride(-1)


def ddim_update(m, x, noise_i, a_t, s_t, coef_i, prediction_type: str) -> torch.Tensor:
    """x_p from model output m [B, C, H, W] at x_t (noise_i None: no noise term); one launch."""
    check_step(m, x, noise_i, prediction_type, False, a_t=a_t, s_t=s_t, coef_i=coef_i)
    check_launchable(x)
    return launch_step(m, x, noise_i, a_t, s_t, coef_i, prediction_type, Walk(x))[0]


def x0_eps(m, x, a_t, s_t, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) from model output m [B, C, H, W] at x_t; one launch."""
    check_step(m, x, None, prediction_type, False, a_t=a_t, s_t=s_t)
    check_launchable(x)
    return launch_step(m, x, None, a_t, s_t, None, prediction_type, Walk(x))


def launch_step(m, x, noise_i, a_t, s_t, coef_i, prediction_type, walk: Walk, guidance=None):
    """One launch of _step_kernel: x_p, or (x0, eps) when coef_i is None. Pre-checked.

    guidance: (stats, w, phi) when m is [neg, pos], stats from cfg_rescale.cfg_stats(m, w, walk).
    """
    out, eps, z, coef, coef_stride = step_operands(x, noise_i, a_t, coef_i, walk)
    stats, w, phi = guidance if guidance is not None else (x, a_t, a_t)  # placeholders, never read
    _step_kernel[walk.grid](
        m, x, z, out, eps, stats, w, phi, a_t, s_t, coef, coef_stride,
        sample_stride(w), sample_stride(phi), sample_stride(a_t), sample_stride(s_t),
        0 if coef_i is None else sample_stride(coef_i, row=1),
        walk.batch, walk.n, walk.d2, walk.d3, walk.chunks,
        *walk.strides(m), *walk.strides(x), *walk.strides(z), *walk.strides(out),
        ITERS=walk.iters, BLOCK=BLOCK, P_POW2=walk.chunks_pow2,
        PRED=PREDICTION_CODES[prediction_type], X0_EPS=coef_i is None,
        DENSE=walk.dense(m, x, z, out), CFG=guidance is not None, NOISE=noise_i is not None,
        enable_fp_fusion=False)
    return out, eps


# ---------------------------------------------------------------------------------------------
# References (also the CPU fallback)


def x0_eps_reference(m, x, a_t, s_t, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """engine.prediction.to_x0_eps in fp32 whatever m's dtype (a_t, s_t shared or [B])."""
    return to_x0_eps(m.float(), x, per_sample(a_t), per_sample(s_t), prediction_type)


def ddim_update_reference(m, x, noise_i, a_t, s_t, coef_i, prediction_type: str) -> torch.Tensor:
    """to_x0_eps then the DDIM update, in fp32 (coef_i [3] shared or [B, 3])."""
    return ddim_update_line(*x0_eps_reference(m, x, a_t, s_t, prediction_type), noise_i,
                            per_sample(coef_i, row=1))
