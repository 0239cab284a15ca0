"""Noise schedules as pure functions: betas, zero terminal SNR, timestep spacing (float64, host).

Sources: Lin et al. 2023 (arXiv:2305.08891) Algorithm 1 and Table 2; Karras et al. 2022 eq. 5.
Timesteps are 0-based training indices 0..T-1. Every function returns new float64/int64 CPU
tensors; nothing here touches a device.
"""
import math

import numpy as np
import torch

from .errors import InvalidInputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "linspace", "trailing", "karras")
# Whose timestep list a spacing name means: Lin et al. Table 2 as DDIMScheduler computes it
# ("ddim"), EulerDiscreteScheduler's and HeunDiscreteScheduler's ("euler": fractional
# timesteps, sigma interpolated linearly), DPMSolverMultistepScheduler's ("dpm": S + 1 points
# for linspace and leading, the last dropped; karras timesteps rounded).
CONVENTIONS = ("ddim", "euler", "dpm")
_F64 = torch.float64


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               max_beta: float = 0.999) -> torch.Tensor:
    """Betas of the named schedule; cosine is Nichol & Dhariwal 2021 eq. 17 capped at max_beta."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=_F64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=_F64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        u = torch.arange(T + 1, dtype=_F64) / T
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
    raise InvalidInputError(f"beta_schedule={beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def abar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """Cumulative product of (1 - beta): abar[t] for t = 0..T-1."""
    return torch.cumprod(1 - betas, dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. Algorithm 1: shift and scale sqrt(abar) so abar[T-1] == 0 and abar[0] is kept."""
    a = abar_from_betas(betas).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    abar = a**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def train_abar(beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               zero_terminal_snr: bool) -> torch.Tensor:
    """abar[t] of the training schedule, rescaled to zero terminal SNR when asked."""
    # The cosine cap (0.999) exists to avoid abar_T == 0; zero terminal SNR wants exactly that.
    max_beta = 1.0 if zero_terminal_snr else 0.999
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, max_beta)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return abar_from_betas(betas)


def check_num_steps(num_train_timesteps: int, num_steps: int) -> None:
    """Raise unless 1 <= num_steps <= T (more steps than training timesteps cannot be distinct)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise InvalidInputError(f"num_inference_steps={num_steps}; expected an integer in "
                         f"[1, {num_train_timesteps}]")


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_steps: int,
                     steps_offset: int = 0) -> torch.Tensor:
    """Lin et al. Table 2 spacings: S descending integer timesteps (int64)."""
    T, S = num_train_timesteps, num_steps
    check_num_steps(T, S)
    if spacing == "leading":
        t = (torch.arange(S, dtype=torch.int64) * (T // S)).flip(0) + steps_offset
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, S, dtype=_F64).round().flip(0).to(torch.int64)
    elif spacing == "trailing":
        # T - k*T/S for k = 0..S-1, rounded half to even as numpy does, minus one: starts at T-1.
        t = (T - torch.arange(S, dtype=_F64) * (T / S)).round().to(torch.int64) - 1
    else:
        raise InvalidInputError(f"timestep_spacing={spacing!r}; expected one of {SPACINGS[:3]}")
    if int(t.max()) > T - 1 or int(t.min()) < 0:
        raise InvalidInputError(f"steps_offset={steps_offset} moves {spacing} timesteps outside [0, {T - 1}]")
    return t


def class_timesteps(convention: str, spacing: str, abar_train: torch.Tensor, num_steps: int,
                    steps_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [S], abar [S]) as the diffusers class of `convention` spaces them (float64)."""
    T, S = len(abar_train), num_steps
    check_num_steps(T, S)
    if convention == "ddim":
        t = spaced_timesteps(spacing, T, S, steps_offset)
        return t.to(_F64), abar_train[t]
    n = S + 1 if convention == "dpm" and spacing != "trailing" else S
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)[::-1]
    elif spacing == "leading":
        t = (np.arange(n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / S).round() - 1
    else:
        raise InvalidInputError(f"timestep_spacing={spacing!r}; expected one of {SPACINGS[:3]}")
    t = t[:S].astype(np.float64)
    if convention == "dpm":
        t = t.round()
    if t.max() > T - 1 or t.min() < 0:
        raise InvalidInputError(f"steps_offset={steps_offset} moves {spacing} timesteps outside [0, {T - 1}]")
    sigma = np.interp(t, np.arange(T), sigmas_from_abar(abar_train).numpy())  # linear in sigma
    t, sigma = torch.from_numpy(t), torch.from_numpy(sigma)
    return t, torch.where(torch.isinf(sigma), 0.0, 1 / (1 + sigma**2)).to(_F64)


def sigmas_from_abar(abar: torch.Tensor) -> torch.Tensor:
    """EDM noise level sigma = sqrt((1 - abar) / abar); inf where abar == 0."""
    return ((1 - abar) / abar).sqrt()


def timestep_for_sigma(sigma: torch.Tensor, abar_train: torch.Tensor) -> torch.Tensor:
    """Continuous timestep with that sigma, by interpolating log(sigma) over the training table."""
    sig = sigmas_from_abar(abar_train)
    finite = torch.isfinite(sig)
    log_sig = sig[finite].log().numpy()
    t_grid = torch.arange(len(abar_train), dtype=_F64)[finite].numpy()
    t = np.interp(sigma.log().numpy(), log_sig, t_grid)
    t = torch.from_numpy(np.asarray(t, dtype=np.float64))
    return torch.where(torch.isinf(sigma), torch.tensor(len(abar_train) - 1.0, dtype=_F64), t)


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras et al. eq. 5: num_steps sigmas from sigma_max down to sigma_min."""
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=_F64)
    ramp = torch.linspace(0, 1, num_steps, dtype=_F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_timesteps(abar_train: torch.Tensor, num_steps: int, rho: float = 7.0,
                     sigma_min: float | None = None, sigma_max: float | None = None):
    """(timesteps, abar) of a rho-schedule; with zero terminal SNR the first step is t = T-1."""
    sig = sigmas_from_abar(abar_train)
    finite = sig[torch.isfinite(sig)]
    smin = float(finite.min()) if sigma_min is None else sigma_min
    smax = float(finite.max()) if sigma_max is None else sigma_max
    zero_snr = bool(abar_train[-1] == 0)
    # sigma = inf has no place on a rho-ramp: spend one step there, ramp the rest
    # (docs/math.md#edm-euler-and-heun).
    n_ramp = num_steps - 1 if zero_snr else num_steps
    sigmas = karras_sigmas(n_ramp, smin, smax, rho) if n_ramp > 0 else sigmas_from_abar(abar_train[:0])
    if zero_snr:
        sigmas = torch.cat([torch.tensor([math.inf], dtype=_F64), sigmas])
    return timestep_for_sigma(sigmas, abar_train), 1 / (1 + sigmas**2)
