"""One sampler step between two UNet calls: CFG + rescale, x0/eps conversion, DDIM update.

Launches per step: 2 with cfg, 1 without.
- cfg=False: the step is elementwise, so it is one pass (sampler_update's math, one kernel).
- cfg=True: the rescale ratio of sample i is a reduction over all of sample i, and every output
  element of sample i depends on it. A single launch would need a grid-wide barrier between the
  reduction and the update (cooperative launch, which Triton does not expose and which can
  deadlock when programs are not all resident) or one program per sample (grid = B: 1 or 2 of an
  H100's 132 SMs streaming an SDXL latent). So: launch 1 (`cfg_rescale._cfg_stats_kernel`)
  writes per-chunk (mean, M2) of pos and cfg, [B, P<=256, 4]; launch 2 (`_guided_step_kernel`)
  merges a sample's chunks (each program redoes this tiny merge instead of paying a third
  launch), recomputes cfg from m, rescales, converts to x0/eps and writes x_p (or x0 and eps).
m is read twice (the second read mostly from L2); x, z are read and x_p written once. phi is a
device value, so the stats pass runs even when phi = 0 (which still returns plain CFG bit for
bit: 0*(cfg*ratio) + 1*cfg).
"""
import torch

from engine.samplers import ddim_update as ddim_update_line

from ._common import BLOCK, PREDICTION_CODES, Walk, check_launchable, tile_offsets, use_triton
from ._triton import tl, triton
from .cfg_rescale import cfg_rescale_reference, cfg_stats, guided_tile, load_pair, rescale_ratio
from .sampler_update import (check_step, launch_sampler_update, load_coefs,
                             step_operands, write_step, x0_eps_reference)

# ---------------------------------------------------------------------------------------------
# Kernel


@triton.jit
def _guided_step_kernel(
    m_ptr,  # [2B, C, H, W] model output [neg, pos], model dtype
    x_ptr,  # [B, C, H, W] fp32 state x_t
    z_ptr,  # [B, C, H, W] fp32 noise of this step (unused when X0_EPS)
    out_ptr,  # [B, C, H, W] fp32 out: x_p, or x0 when X0_EPS
    eps_ptr,  # [B, C, H, W] fp32 out: eps when X0_EPS (same strides as out)
    stats_ptr,  # [B, P, 4] fp32 from cfg_rescale._cfg_stats_kernel
    w_ptr, phi_ptr,  # 0-dim fp32 guidance scale and rescale
    a_ptr, s_ptr,  # 0-dim fp32 sqrt(abar_t), sqrt(1 - abar_t)
    coef_ptr, coef_stride,  # [3] fp32 DDIM row (sqrt(abar_p), c_eps, sigma)
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
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    a, s, c0, c1, c2 = load_coefs(a_ptr, s_ptr, coef_ptr, coef_stride, X0_EPS)
    w, phi = tl.load(w_ptr), tl.load(phi_ptr)
    ratio = rescale_ratio(stats_ptr, b, P, N, ITERS * BLOCK, P_POW2)
    for it in range(ITERS):
        j = (p * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        neg, pos = load_pair(m_ptr, b, B, j, mask, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)
        write_step(guided_tile(neg, pos, w, phi, ratio), x_ptr, z_ptr, out_ptr, eps_ptr,
                   tile_offsets(b, j, sx_b, sx_1, sx_2, sx_3, D2, D3, DENSE),
                   tile_offsets(b, j, sz_b, sz_1, sz_2, sz_3, D2, D3, DENSE),
                   tile_offsets(b, j, so_b, so_1, so_2, so_3, D2, D3, DENSE),
                   mask, a, s, c0, c1, c2, PRED, X0_EPS)


# ---------------------------------------------------------------------------------------------
# Launchers


def guided_step_triton(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                       prediction_type: str, cfg: bool) -> torch.Tensor:
    """x_p [B, C, H, W] fp32 with the Triton kernels; 2 launches with cfg, 1 without."""
    _check(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale, prediction_type, cfg)
    check_launchable(x)
    return _launch(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                   prediction_type, cfg)[0]


def guided_x0_eps_triton(m, x, a_t, s_t, guidance_scale, guidance_rescale,
                         prediction_type: str, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) [B, C, H, W] fp32 with the Triton kernels; 2 launches with cfg, 1 without."""
    _check(m, x, None, a_t, s_t, None, guidance_scale, guidance_rescale, prediction_type, cfg)
    check_launchable(x)
    return _launch(m, x, None, a_t, s_t, None, guidance_scale, guidance_rescale,
                   prediction_type, cfg)


def _check(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale, prediction_type,
           cfg):
    scalars = dict(a_t=a_t, s_t=s_t, guidance_scale=guidance_scale,
                   guidance_rescale=guidance_rescale)
    if coef_i is not None:
        scalars["coef_i"] = coef_i
    check_step(m, x, noise_i, prediction_type, cfg, **scalars)


def _launch(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale, prediction_type,
            cfg):
    if not cfg:  # m is the positive output as is: the sampler update alone
        return launch_sampler_update(m, x, noise_i, a_t, s_t, coef_i, prediction_type)
    walk = Walk(x)
    stats = cfg_stats(m, guidance_scale, walk)  # launch 1
    out, eps, z, coef, coef_stride = step_operands(x, noise_i, a_t, coef_i, walk)
    _guided_step_kernel[walk.grid](  # launch 2
        m, x, z, out, eps, stats, guidance_scale, guidance_rescale, a_t, s_t, coef, coef_stride,
        walk.batch, walk.n, walk.d2, walk.d3, walk.chunks,
        *walk.strides(m), *walk.strides(x), *walk.strides(z), *walk.strides(out),
        ITERS=walk.iters, BLOCK=BLOCK, P_POW2=walk.chunks_pow2,
        PRED=PREDICTION_CODES[prediction_type], X0_EPS=noise_i is None,
        DENSE=walk.dense(m, x, z, out), enable_fp_fusion=False)
    return out, eps


# ---------------------------------------------------------------------------------------------
# References (also the CPU fallback)


def guided_x0_eps_reference(m, x, a_t, s_t, guidance_scale, guidance_rescale,
                            prediction_type: str, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """engine.guidance.guide (when cfg) then engine.prediction.to_x0_eps, in fp32."""
    if cfg:
        m = cfg_rescale_reference(m, guidance_scale, guidance_rescale)
    return x0_eps_reference(m, x, a_t, s_t, prediction_type)


def guided_step_reference(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                          prediction_type: str, cfg: bool) -> torch.Tensor:
    """guided_x0_eps_reference then the DDIM update of engine.samplers.sample_ddim."""
    x0, eps = guided_x0_eps_reference(m, x, a_t, s_t, guidance_scale, guidance_rescale,
                                      prediction_type, cfg)
    return ddim_update_line(x0, eps, noise_i, coef_i)


# ---------------------------------------------------------------------------------------------
# Entry points: one check, then Triton or the reference


def guided_step(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                prediction_type: str, cfg: bool) -> torch.Tensor:
    """x_p of one DDIM step from the model output m at x_t (with CFG + rescale when cfg).

    m: [2B, C, H, W] ([neg, pos]) when cfg, else [B, C, H, W], model dtype; x, noise_i:
    [B, C, H, W] fp32 (noise_i may be the view noise[:, i]); a_t, s_t, guidance_scale,
    guidance_rescale: 0-dim fp32 tensors; coef_i: [3] fp32, the plan_ddim row. Returns fp32.
    """
    _check(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale, prediction_type, cfg)
    if use_triton(x):
        return _launch(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                       prediction_type, cfg)[0]
    return guided_step_reference(m, x, noise_i, a_t, s_t, coef_i, guidance_scale,
                                 guidance_rescale, prediction_type, cfg)


def guided_x0_eps(m, x, a_t, s_t, guidance_scale, guidance_rescale, prediction_type: str,
                  cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) fp32 from model output m at x_t, with CFG + rescale when cfg (as guided_step)."""
    _check(m, x, None, a_t, s_t, None, guidance_scale, guidance_rescale, prediction_type, cfg)
    if use_triton(x):
        return _launch(m, x, None, a_t, s_t, None, guidance_scale, guidance_rescale,
                       prediction_type, cfg)
    return guided_x0_eps_reference(m, x, a_t, s_t, guidance_scale, guidance_rescale,
                                   prediction_type, cfg)
