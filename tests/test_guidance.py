"""CFG with per-sample std rescale: docs/math.md#cfg-with-per-sample-rescale."""
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from lumen.engine.guidance import guide


def pair(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 9, 7, generator=g), torch.randn(batch, 4, 9, 7, generator=g) * 1.5


def test_rescale_zero_is_plain_cfg_bit_for_bit():
    neg, pos = pair()
    assert torch.equal(guide(neg, pos, 7.5, 0.0), neg + 7.5 * (pos - neg))
    assert torch.equal(guide(neg, pos, torch.tensor(7.5), torch.tensor(0.0)), neg + 7.5 * (pos - neg))


def test_rescale_matches_the_paper_formula():
    neg, pos = pair()
    cfg = neg + 7.5 * (pos - neg)
    ratio = pos.std(dim=(1, 2, 3), keepdim=True) / cfg.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(guide(neg, pos, 7.5, 0.7), 0.7 * cfg * ratio + 0.3 * cfg)
    torch.testing.assert_close(guide(neg, pos, 7.5, 0.7), rescale_noise_cfg(cfg, pos, 0.7))


def test_full_rescale_restores_positive_std_per_sample():
    neg, pos = pair()
    out = guide(neg, pos, 7.5, 1.0)
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), pos.std(dim=(1, 2, 3)))


def test_rescale_is_per_sample():
    neg, pos = pair()
    out = guide(neg, pos, 7.5, 0.7)
    neg2, pos2 = neg.clone(), pos.clone()
    neg2[1], pos2[1] = 100 * neg[1], -3 * pos[1]  # another sample, very different std
    out2 = guide(neg2, pos2, 7.5, 0.7)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.allclose(out[1], out2[1])
    single = guide(neg[:1], pos[:1], 7.5, 0.7)
    torch.testing.assert_close(single[0], out[0], rtol=1e-6, atol=1e-6)


def test_zero_std_is_guarded_where_diffusers_gives_nan():
    neg, pos = torch.zeros(2, 4, 8, 8), torch.full((2, 4, 8, 8), 0.5)
    assert bool(rescale_noise_cfg(neg + 7.5 * (pos - neg), pos, 0.7).isnan().all())
    out = guide(neg, pos, 7.5, 0.7)
    assert torch.equal(out, neg + 7.5 * (pos - neg))  # left unrescaled


def test_guidance_one_returns_positive():
    neg, pos = pair()
    torch.testing.assert_close(guide(neg, pos, 1.0, 0.0), pos, rtol=0, atol=1e-6)
