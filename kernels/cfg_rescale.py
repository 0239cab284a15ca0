"""Classifier-free guidance with per-sample std rescale (Lin et al. Algorithm 2; the math:
docs/math.md#cfg-with-per-sample-rescale).

Two launches: `_cfg_stats_kernel` (here) reduces each chunk of each sample to (mean, M2) of pos
and of cfg; guided_step.py's kernel merges a sample's chunks into sd_pos/sd_cfg with
`rescale_ratio` and applies `guided_tile`, fused with the prediction conversion and update. No E[x^2] - E[x]^2 in
fp32: values are shifted by the sample's first element, each tile's M2 is taken about the tile
mean (corrected two-pass), and tiles and chunks merge with Chan et al.'s update; the test
test_rescale_std_survives_a_large_mean pins this. w and phi are read from device memory, never
on the host.
"""
import torch

from lumen.engine.guidance import guide

from ._common import (BLOCK, UNALIGNED_SCALARS, Walk, batch_index, per_sample, sample_stride,
                      tile_offsets, tile_sum)
from ._triton import tl, triton

# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def load_pair(m_ptr, b, B, j, mask,
              sm_b, sm_1, sm_2, sm_3,  # m strides in walk order
              D2, D3, DENSE: tl.constexpr):
    """(neg, pos) tiles of sample b (int64) as fp32; m is [neg (B samples), pos (B samples)]."""
    neg_off = tile_offsets(b, j, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)
    pos_off = tile_offsets(b + B, j, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)  # sample b of pos
    neg = tl.load(m_ptr + neg_off, mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(m_ptr + pos_off, mask=mask, other=0.0).to(tl.float32)
    return neg, pos


@triton.jit
def merge_moments(n_a, mean_a, m2_a, v, mask, n_b):
    """Chan et al. parallel update of a running (mean, M2) over n_a values with tile v[mask].

    The tile's own moments use the corrected two-pass formula (Chan, Golub, LeVeque 1983): the
    fp32 tile mean is off by ~ulp(sum)/n, and sum(d) removes that error from both mean and M2.
    Divisions are IEEE round-to-nearest (tl.div_rn), as the interpreter computes: a plain `/`
    compiles to the GPU's approximate division.
    """
    n_safe = tl.maximum(n_b, 1.0)
    mean_b = tl.div_rn(tile_sum(tl.where(mask, v, 0.0)), n_safe)
    d = tl.where(mask, v - mean_b, 0.0)
    sum_d = tile_sum(d)
    m2_b = tl.maximum(tile_sum(d * d) - tl.div_rn(sum_d * sum_d, n_safe), 0.0)  # >= 0 exactly
    mean_b += tl.div_rn(sum_d, n_safe)
    frac = tl.div_rn(n_b, tl.maximum(n_a + n_b, 1.0))
    delta = mean_b - mean_a
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def guided_tile(neg, pos, w, phi, ratio):
    """engine.guidance.guide on a tile, same operation order (phi = 0 gives cfg bit for bit)."""
    cfg = neg + w * (pos - neg)
    return phi * (cfg * ratio) + (1 - phi) * cfg


@triton.jit
def _pooled_std(part_ptr, valid, n_p, n):
    """Unbiased std of a sample from its chunks' (mean, M2): Chan et al. merge, vectorised.

    n: the sample's element count as an fp32 value (N may be a compile-time 1, see rescale_ratio).
    """
    mean_p = tl.load(part_ptr, mask=valid, other=0.0)
    m2_p = tl.load(part_ptr + 1, mask=valid, other=0.0)
    mean = tl.div_rn(tile_sum(n_p * mean_p), n)
    d = mean_p - mean
    sum_d = tile_sum(n_p * d)  # corrects the fp32 rounding of mean, as in merge_moments
    m2 = tl.maximum(tile_sum(m2_p) + tile_sum(n_p * d * d) - tl.div_rn(sum_d * sum_d, n), 0.0)
    return tl.sqrt_rn(tl.div_rn(m2, n - 1.0))  # N = 1: 0/0 = NaN, which the ratio guard maps to 1


@triton.jit
def rescale_ratio(stats_ptr, b, P, N, CHUNK, P_POW2: tl.constexpr):
    """sd_pos / sd_cfg of sample b, or 1 where sd_cfg is 0 (or NaN), as engine.guidance.guide."""
    p = tl.arange(0, P_POW2)
    valid = p < P
    n_p = tl.where(valid, tl.minimum(N - p * CHUNK, CHUNK), 0).to(tl.float32)
    row = stats_ptr + (b * P + p) * 4  # [mean_pos, M2_pos, mean_cfg, M2_cfg] per chunk
    # Triton passes an int argument equal to 1 as a compile-time constant: make n a fp32 value.
    n = tl.full((), N, tl.int32).to(tl.float32)
    sd_pos = _pooled_std(row, valid, n_p, n)
    sd_cfg = _pooled_std(row + 2, valid, n_p, n)
    nonzero = sd_cfg > 0
    return tl.where(nonzero, tl.div_rn(sd_pos, tl.where(nonzero, sd_cfg, 1.0)), 1.0)


@triton.jit(do_not_specialize_on_alignment=UNALIGNED_SCALARS[:1])
def _cfg_stats_kernel(
    m_ptr,  # [2B, C, H, W] model output [neg, pos], model dtype
    w_ptr,  # 0-dim or [B] fp32 guidance scale
    sw_b,  # per-sample stride of w (0: shared)
    stats_ptr,  # [B, P, 4] fp32 out: per chunk shifted mean and M2 of pos, then of cfg
    B, N, D2, D3,  # batch, elements per sample, walk sizes (see _common)
    sm_b, sm_1, sm_2, sm_3,  # m strides in walk order
    P,  # chunks per sample (grid dim 1)
    ITERS: tl.constexpr,  # tiles per chunk
    BLOCK: tl.constexpr,  # elements per tile
    DENSE: tl.constexpr,  # m dense in walk order: offsets need no index arithmetic
):
    b = batch_index()
    p = tl.program_id(1)
    w = tl.load(w_ptr + b * sw_b)
    # Moments of (v - v[first element of the sample]): a shift every chunk of the sample shares,
    # so chunk means are small and exact enough in fp32 even when |mean| >> std.
    neg0 = tl.load(m_ptr + b * sm_b).to(tl.float32)
    pos0 = tl.load(m_ptr + (B + b) * sm_b).to(tl.float32)
    cfg0 = neg0 + w * (pos0 - neg0)
    n = 0.0
    mean_pos, m2_pos, mean_cfg, m2_cfg = 0.0, 0.0, 0.0, 0.0
    for it in range(ITERS):
        j = (p * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = j < N
        neg, pos = load_pair(m_ptr, b, B, j, mask, sm_b, sm_1, sm_2, sm_3, D2, D3, DENSE)
        cfg = neg + w * (pos - neg)
        n_b = tl.minimum(tl.maximum(N - (p * ITERS + it) * BLOCK, 0), BLOCK).to(tl.float32)
        mean_pos, m2_pos = merge_moments(n, mean_pos, m2_pos, pos - pos0, mask, n_b)
        mean_cfg, m2_cfg = merge_moments(n, mean_cfg, m2_cfg, cfg - cfg0, mask, n_b)
        n += n_b
    row = stats_ptr + (b * P + p) * 4
    tl.store(row, mean_pos)
    tl.store(row + 1, m2_pos)
    tl.store(row + 2, mean_cfg)
    tl.store(row + 3, m2_cfg)


# ---------------------------------------------------------------------------------------------
# Launchers


def cfg_stats(m: torch.Tensor, guidance_scale: torch.Tensor, walk: Walk) -> torch.Tensor:
    """Launch 1 of guidance: [B, P, 4] per-chunk (mean, M2) of pos and cfg. Inputs pre-checked."""
    stats = torch.empty(walk.batch, walk.chunks, 4, dtype=torch.float32, device=m.device)
    _cfg_stats_kernel[walk.grid](
        m, guidance_scale, sample_stride(guidance_scale), stats, walk.batch, walk.n, walk.d2, walk.d3, *walk.strides(m),
        walk.chunks, ITERS=walk.iters, BLOCK=BLOCK, DENSE=walk.dense(m), enable_fp_fusion=False)
    return stats


# ---------------------------------------------------------------------------------------------
# Reference


def cfg_rescale_reference(m: torch.Tensor, guidance_scale: torch.Tensor,
                          guidance_rescale: torch.Tensor) -> torch.Tensor:
    """engine.guidance.guide on m = [neg, pos], in fp32 whatever m's dtype."""
    m_neg, m_pos = m.float().chunk(2)
    return guide(m_neg, m_pos, per_sample(guidance_scale), per_sample(guidance_rescale))
