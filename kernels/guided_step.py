"""One sampler step between two UNet calls: CFG + rescale, x0/eps conversion, DDIM update.

Launches per step: 2 with cfg, 1 without.
- cfg=False: the step is elementwise, so it is one pass (sampler_update's math, one kernel).
- cfg=True: the rescale ratio of sample i is a reduction over all of sample i, and every output
  element of sample i depends on it. A single launch would need a grid-wide barrier between the
  reduction and the update (cooperative launch, which Triton does not expose and which can
  deadlock when programs are not all resident) or one program per sample (grid = B: 1 or 2 of an
  H100's 132 SMs streaming an SDXL latent). So: launch 1 (`cfg_rescale._cfg_stats_kernel`)
  writes per-chunk (mean, M2) of pos and cfg, [B, P<=256, 4]; launch 2
  merges a sample's chunks (each program redoes this tiny merge instead of paying a third
  launch), recomputes cfg from m, rescales, converts to x0/eps and writes x_p (or x0 and eps).
  Launch 2 is sampler_update's `_step_kernel` with CFG set: one kernel serves both cases.
m is read twice (the second read mostly from L2); x, z are read and x_p written once. phi is a
device value, so the stats pass runs even when phi = 0 (which still returns plain CFG bit for
bit: 0*(cfg*ratio) + 1*cfg).
"""
import torch

from lumen.engine.samplers import ddim_update as ddim_update_line

from ._common import Walk, check_launchable, per_sample, use_triton
from .cfg_rescale import cfg_rescale_reference, cfg_stats
from .sampler_update import check_step, launch_step, x0_eps_reference

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
    walk = Walk(x)
    if not cfg:  # m is the positive output as is: the sampler update alone
        return launch_step(m, x, noise_i, a_t, s_t, coef_i, prediction_type, walk)
    stats = cfg_stats(m, guidance_scale, walk)  # launch 1
    return launch_step(m, x, noise_i, a_t, s_t, coef_i, prediction_type, walk,  # launch 2
                       (stats, guidance_scale, guidance_rescale))


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
    return ddim_update_line(x0, eps, noise_i, per_sample(coef_i, row=1))


# ---------------------------------------------------------------------------------------------
# Entry points: one check, then Triton or the reference


def guided_step(m, x, noise_i, a_t, s_t, coef_i, guidance_scale, guidance_rescale,
                prediction_type: str, cfg: bool) -> torch.Tensor:
    """x_p of one DDIM step from the model output m at x_t (with CFG + rescale when cfg).

    m: [2B, C, H, W] ([neg, pos]) when cfg, else [B, C, H, W], model dtype; x, noise_i:
    [B, C, H, W] fp32 (noise_i may be the view noise[:, i], or None for a step without noise,
    which then is neither allocated nor read); a_t, s_t, guidance_scale,
    guidance_rescale: 0-dim fp32 tensors; coef_i: [3] fp32, the plan_ddim row. Returns fp32.
    Per sample instead (each sample at its own step, with its own guidance): a_t, s_t,
    guidance_scale, guidance_rescale [B] and coef_i [B, 3].
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
