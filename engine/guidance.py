"""Classifier-free guidance with per-sample std rescale: Lin et al. Algorithm 2.

The math: docs/math.md#cfg-with-per-sample-rescale.
"""
import torch


def guide(m_neg: torch.Tensor, m_pos: torch.Tensor, guidance_scale: torch.Tensor | float,
          guidance_rescale: torch.Tensor | float) -> torch.Tensor:
    """cfg = neg + w*(pos - neg), then mixed with cfg rescaled to pos's std, per sample.

    m_neg, m_pos: [B, ...] raw model outputs (v for v-models). guidance_scale and
    guidance_rescale may be 0-dim device tensors so a captured graph can take new values.
    guidance_rescale = 0 returns plain CFG bit for bit; a sample whose cfg has zero std is
    left unrescaled instead of divided by zero.
    """
    cfg = m_neg + guidance_scale * (m_pos - m_neg)
    dims = tuple(range(1, cfg.ndim))
    sd_pos = m_pos.std(dim=dims, keepdim=True)
    sd_cfg = cfg.std(dim=dims, keepdim=True)
    nonzero = sd_cfg > 0
    ratio = torch.where(nonzero, sd_pos / torch.where(nonzero, sd_cfg, 1.0), 1.0)
    return guidance_rescale * (cfg * ratio) + (1 - guidance_rescale) * cfg
