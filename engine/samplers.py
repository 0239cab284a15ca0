"""Samplers in x0 form, exact at zero terminal SNR: DDIM, EDM Euler/Heun, Euler ancestral,
DPM-Solver++(2M).

Each sampler is two pure functions: `plan_*` builds the run's coefficients on the host in
float64 (branches on schedule values happen here, once), and `sample_*` is the loop, which only
indexes device tensors, so it has no host sync and a CUDA graph can capture it whole.

State is the VP latent x_t = a_t*x0 + s_t*eps (a_t = sqrt(abar_t), s_t = sqrt(1 - abar_t)).
`denoise(x, k)` evaluates the model at evaluation point k of the plan and returns (x0, eps).
After the last listed timestep every sampler lands on abar = 1, where x == x0.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch

from . import schedules
from .config import SamplerConfig

_F64 = torch.float64


@dataclass(frozen=True)
class Plan:
    """Everything one sampling run needs, fixed before the loop starts (host float64)."""

    sampler: str
    timesteps: torch.Tensor  # [E] model timestep of each evaluation point
    abar: torch.Tensor  # [E] abar at each evaluation point
    coef: torch.Tensor  # [S, K] per-step update coefficients
    abar_start: float  # abar of the first listed timestep (before any churn)
    corrector: tuple[bool, ...] = ()  # heun: per step, whether a second evaluation follows
    landing: torch.Tensor | None = None  # [S] abar each step lands on (make_plan sets it)

    @property
    def num_steps(self) -> int:
        return self.coef.shape[0]

    @property
    def needs_noise(self) -> bool:
        """Whether any step draws fresh noise (DDIM or Euler ancestral with eta > 0, EDM churn)."""
        column = {"ddim": 2, "euler_ancestral": 2, "euler": 1, "heun": 1}.get(self.sampler)
        return column is not None and bool(self.coef[:, column].any())

    def to(self, device, dtype=torch.float32) -> "DevicePlan":
        """Device copy: timesteps, a, s and coefficients as `dtype` tensors."""
        def put(t):
            return t.to(device=device, dtype=dtype)
        start = torch.tensor([self.abar_start], dtype=torch.float64)
        land = self.landing
        return DevicePlan(self, put(self.timesteps), put(self.abar.sqrt()), put((1 - self.abar).sqrt()),
                          put(self.coef), put(start.sqrt())[0], put((1 - start).sqrt())[0],
                          None if land is None else put(land.sqrt()),
                          None if land is None else put((1 - land).sqrt()))


@dataclass(frozen=True)
class DevicePlan:
    """A Plan's tensors on the device the loop runs on."""

    plan: Plan
    timesteps: torch.Tensor  # [E]
    a: torch.Tensor  # [E]
    s: torch.Tensor  # [E]
    coef: torch.Tensor  # [S, K]
    a_start: torch.Tensor  # 0-dim: sqrt(abar) of the first listed timestep
    s_start: torch.Tensor  # 0-dim: sqrt(1 - abar) of the first listed timestep
    a_land: torch.Tensor | None = None  # [S] sqrt(abar) each step lands on (1 after the last)
    s_land: torch.Tensor | None = None  # [S] sqrt(1 - abar) each step lands on


def step_schedule(config: SamplerConfig, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [S], abar [S+1]) of the sampling steps; abar[S] = 1 is the clean target."""
    abar_train = config.train_abar()
    if config.timestep_spacing == "karras":
        schedules.check_num_steps(config.num_train_timesteps, num_steps)
        t, abar = schedules.karras_timesteps(abar_train, num_steps, config.rho,
                                             config.sigma_min, config.sigma_max)
        if config.timestep_convention == "dpm":  # the model sees rounded timesteps, sigmas kept
            t = t.round()
    else:
        t, abar = schedules.class_timesteps(config.timestep_convention, config.timestep_spacing,
                                            abar_train, num_steps, config.steps_offset)
    return t, torch.cat([abar, torch.ones(1, dtype=_F64)])


def plan_ddim(t: torch.Tensor, abar: torch.Tensor, eta: float) -> Plan:
    """Song et al. eq. 12 in x0 form; coef[i] = (sqrt(abar_p), eps weight, sigma)."""
    abar_t, abar_p = abar[:-1], abar[1:]
    sigma = eta * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    # Clamped: at eta = 1 and zero SNR this is one ulp below zero in fp32 (diffusers #5969).
    c_eps = (1 - abar_p - sigma**2).clamp(min=0).sqrt()
    return Plan("ddim", t, abar_t, torch.stack([abar_p.sqrt(), c_eps, sigma], dim=1), float(abar[0]))


def ddim_update(x0: torch.Tensor, eps: torch.Tensor, z: torch.Tensor | None,
                coef_i: torch.Tensor) -> torch.Tensor:
    """x_p = sqrt(abar_p)*x0 + sqrt(1 - abar_p - sigma^2)*eps + sigma*z, coef_i a plan_ddim row.

    z None: a run that draws no noise (sigma = 0 on every step), so the term is left out.
    """
    x_p = coef_i[0] * x0 + coef_i[1] * eps
    return x_p if z is None else x_p + coef_i[2] * z


def plan_euler_ancestral(t: torch.Tensor, abar: torch.Tensor, eta: float) -> Plan:
    """k-diffusion's sample_euler_ancestral in VP state; coef[i] = (a_p, eps weight, noise weight).

    get_ancestral_step: sigma_up = min(sigma_p, eta*sqrt(sigma_p^2 (sigma^2 - sigma_p^2)/sigma^2)),
    sigma_down = sqrt(sigma_p^2 - sigma_up^2); the Euler step to sigma_down in x0 form is
    x0 + sigma_down*eps, plus sigma_up*z. Times a_p (VE -> VP) that is
    x_p = a_p*x0 + sqrt(1 - abar_p - (a_p*sigma_up)^2)*eps + a_p*sigma_up*z, DDIM's form, so it
    runs through DDIM's update. From sigma = inf (zero SNR) sigma_up -> eta*sigma_p, which the
    float64 formula gives as is; at sigma_p = 0 (the final step) no noise is added.
    """
    sigma = schedules.sigmas_from_abar(abar)  # [S+1], inf at abar = 0, 0 at the target
    sig, sig_p = sigma[:-1], sigma[1:]
    sigma_up = torch.minimum(sig_p, eta * (sig_p**2 * (1 - sig_p**2 / sig**2)).sqrt())
    abar_p = abar[1:]
    c_noise = abar_p.sqrt() * sigma_up
    # = a_p*sigma_down; written this way it is bit for bit Euler's sqrt(1 - abar_p) at eta = 0.
    c_eps = (1 - abar_p - c_noise**2).clamp(min=0).sqrt()
    return Plan("euler_ancestral", t, abar[:-1], torch.stack([abar_p.sqrt(), c_eps, c_noise], dim=1),
                float(abar[0]))


def sample_ddim(denoise, x: torch.Tensor, plan: DevicePlan, noise: torch.Tensor | None,
                callback=None, step=None, keep=None) -> torch.Tensor:
    """DDIM (Song et al. eq. 12) in x0 form; noise: [B, S, ...], None when the plan draws none.

    step(x, i, z) -> x_p, when given, does denoise and update in one call (kernels.guided_step).
    """
    for i in range(plan.plan.num_steps):
        z = None if noise is None else noise[:, i]
        if step is not None:
            x = step(x, i, z)
        else:
            x = ddim_update(*denoise(x, i), z, plan.coef[i])
        x = x if keep is None else keep(x, i)
        notify(callback, i)
    return x


def plan_dpmpp_2m(t: torch.Tensor, abar: torch.Tensor) -> Plan:
    """Lu et al. 2022 DPM-Solver++(2M); coef[i] = (weight of x, of x0_i, of x0_{i-1})."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    lam = torch.log(a) - torch.log(s)  # -inf at abar = 0, +inf at abar = 1
    h = lam[1:] - lam[:-1]
    S = len(t)
    coef = torch.zeros(S, 3, dtype=_F64)
    coef[:, 0] = s[1:] / s[:-1]
    coef[:, 1] = a[1:] * -torch.expm1(-h)
    for i in range(1, S - 1):  # first order on the first step and on the final step to abar = 1
        if math.isfinite(float(h[i - 1])):
            half_over_r = float(h[i] / h[i - 1]) / 2
            coef[i, 2] = -coef[i, 1] * half_over_r
            coef[i, 1] = coef[i, 1] * (1 + half_over_r)
    return Plan("dpmpp_2m", t, abar[:-1], coef, float(abar[0]))


def sample_dpmpp_2m(denoise, x: torch.Tensor, plan: DevicePlan, noise: torch.Tensor | None,
                    callback=None, keep=None) -> torch.Tensor:
    """DPM-Solver++(2M): x_p = (s_p/s)*x + a_p*(1 - e^-h)*(blend of the last two x0)."""
    c = plan.coef
    x0_prev = None
    for i in range(plan.plan.num_steps):
        x0, _ = denoise(x, i)
        x0_prev = x0 if x0_prev is None else x0_prev  # weight 0 on the first step
        x = c[i, 0] * x + c[i, 1] * x0 + c[i, 2] * x0_prev
        x = x if keep is None else keep(x, i)
        x0_prev = x0
        notify(callback, i)
    return x


def plan_edm(t: torch.Tensor, abar: torch.Tensor, config: SamplerConfig, abar_train: torch.Tensor,
             second_order: bool, total_steps: int | None = None) -> Plan:
    """Karras et al. Algorithm 2 (Heun, or Euler without the corrector), churn included.

    coef[i] = (churn weight of x, churn weight of z, a_p, s_p, corrector weight of x_hat,
    corrector weight of eps + eps'). sigma = inf (zero SNR) gets no churn and no corrector.
    """
    sigma = schedules.sigmas_from_abar(abar)  # [S+1], last is 0
    S = len(t)
    gamma_max = min(config.s_churn / (total_steps or S), math.sqrt(2) - 1)
    in_band = (sigma[:-1] >= config.s_tmin) & (sigma[:-1] <= config.s_tmax) & torch.isfinite(sigma[:-1])
    gamma = torch.where(in_band, torch.tensor(gamma_max, dtype=_F64), torch.zeros((), dtype=_F64))
    sig_hat = sigma[:-1] * (1 + gamma)
    abar_hat = torch.where(gamma > 0, 1 / (1 + sig_hat**2), abar[:-1])
    t_hat = torch.where(gamma > 0, schedules.timestep_for_sigma(sig_hat, abar_train), t)
    a_hat, a, a_p = abar_hat.sqrt(), abar[:-1].sqrt(), abar[1:].sqrt()
    corrector = tuple(bool(second_order and torch.isfinite(sig_hat[i]) and sigma[i + 1] > 0)
                      for i in range(S))
    coef = torch.zeros(S, 6, dtype=_F64)
    churn = gamma > 0  # only where sigma is finite, so a > 0 there
    coef[:, 0] = torch.where(churn, a_hat / a, 1.0)
    coef[:, 1] = torch.where(churn, a_hat * (sig_hat**2 - sigma[:-1] ** 2).sqrt() * config.s_noise, 0.0)
    coef[:, 2], coef[:, 3] = a_p, (1 - abar[1:]).sqrt()
    for i in range(S):
        if corrector[i]:
            coef[i, 4] = a_p[i] / a_hat[i]
            coef[i, 5] = a_p[i] * (sigma[i + 1] - sig_hat[i]) / 2
    # Evaluation points: the (churned) point of each step, then the corrector's point if any.
    ts, abars = [], []
    for i in range(S):
        ts.append(t_hat[i]), abars.append(abar_hat[i])
        if corrector[i]:
            ts.append(t[i + 1]), abars.append(abar[i + 1])
    name = "heun" if second_order else "euler"
    return Plan(name, torch.stack(ts), torch.stack(abars), coef, float(abar[0]), corrector)


def sample_edm(denoise, x: torch.Tensor, plan: DevicePlan, noise: torch.Tensor | None,
               callback=None, keep=None) -> torch.Tensor:
    """Churn, Euler step in x0 form, Heun correction where the plan has one."""
    c, k = plan.coef, 0
    for i, correct in enumerate(plan.plan.corrector):
        if noise is not None:  # None: no step churns, and then c[:, 0] == 1 exactly
            x = c[i, 0] * x + c[i, 1] * noise[:, i]  # x_hat; identity where gamma = 0
        x0, eps = denoise(x, k)
        x_next = c[i, 2] * x0 + c[i, 3] * eps  # = a_p * (x_hat/a_hat + (sigma_p - sigma_hat) * eps)
        k += 1
        if correct:
            _, eps_next = denoise(x_next, k)
            x_next = c[i, 4] * x + c[i, 5] * (eps + eps_next)
            k += 1
        x = x_next if keep is None else keep(x_next, i)
        notify(callback, i)
    return x


def make_plan(config: SamplerConfig, num_steps: int, eta: float = 0.0, start: int = 0) -> Plan:
    """The plan of `config.sampler` for num_steps steps (eta: DDIM's or Euler ancestral's).

    start > 0: only the steps from `start` on (image-to-image runs the last steps of the
    schedule, as diffusers' img2img pipelines do); the coefficients are built for those steps,
    so a multistep sampler starts first order there, and EDM's churn still divides s_churn by
    num_steps."""
    t, abar = step_schedule(config, num_steps)
    t, abar = t[start:], abar[start:]
    if config.sampler == "ddim":
        plan = plan_ddim(t, abar, eta)
    elif config.sampler == "euler_ancestral":
        plan = plan_euler_ancestral(t, abar, eta)
    elif config.sampler == "dpmpp_2m":
        plan = plan_dpmpp_2m(t, abar)
    else:
        plan = plan_edm(t, abar, config, config.train_abar(), second_order=config.sampler == "heun",
                        total_steps=num_steps)
    return dataclasses.replace(plan, landing=abar[1:])


DDIM_FORM = ("ddim", "euler_ancestral")  # x_p = coef[0]*x0 + coef[1]*eps + coef[2]*z
SAMPLE_FNS = {"dpmpp_2m": sample_dpmpp_2m, "euler": sample_edm, "heun": sample_edm}


def sample(denoise, x: torch.Tensor, plan: DevicePlan, noise: torch.Tensor | None,
           callback=None, ddim_step=None, keep=None) -> torch.Tensor:
    """Run the plan's sampler from x (x_T) to the clean sample; callback(i) after each step.

    ddim_step(x, i, z) -> x_p is the fused denoise + DDIM-form update, which DDIM and Euler
    ancestral use; other samplers ignore it. keep(x, i) -> x, if given, runs after step i's
    update (inpainting: the kept region follows the image, noised to where the step landed).
    """
    if plan.plan.sampler in DDIM_FORM:
        return sample_ddim(denoise, x, plan, noise, callback, ddim_step, keep)
    return SAMPLE_FNS[plan.plan.sampler](denoise, x, plan, noise, callback, keep)


def keep_region(x: torch.Tensor, i: int, plan: DevicePlan, mask: torch.Tensor, x0: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
    """Inpainting with a model that does not see the mask: after step i the kept region (mask 0)
    is the image x0 noised with eps to where the step landed; the masked region stays x."""
    return (1 - mask) * (plan.a_land[i] * x0 + plan.s_land[i] * eps) + mask * x


def evaluation_steps(plan: Plan) -> list[int]:
    """The step each evaluation point belongs to (Heun's corrector shares its step's index)."""
    if not plan.corrector:
        return list(range(plan.num_steps))
    return [i for i, second in enumerate(plan.corrector) for _ in range(2 if second else 1)]


def notify(callback, i: int) -> None:
    if callback is not None:
        callback(i)
