"""SamplerConfig: the training schedule a model was trained with plus how Lumen samples it."""
import dataclasses
import math
from dataclasses import dataclass

import torch

from . import schedules
from .errors import InvalidInputError, InvalidTypeError
from .validation import check_choice, check_int, check_real

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")
SAMPLERS = ("ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m")

# Fields that describe how the model was trained; they come from the model's own config.
TRAINING_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                   "zero_terminal_snr", "prediction_type")

# diffusers scheduler class -> (Lumen sampler, the class's timestep convention, as in
# schedules.CONVENTIONS).
_DIFFUSERS_SAMPLERS = {
    "DDIMScheduler": ("ddim", "ddim"),
    "EulerDiscreteScheduler": ("euler", "euler"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "euler"),
    "HeunDiscreteScheduler": ("heun", "euler"),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", "dpm"),
}


@dataclass(frozen=True)
class SamplerConfig:
    """Schedule, parameterisation and sampler; defaults are Lin et al.'s fixed setup."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    # which diffusers class's timestep list the spacing names (schedules.CONVENTIONS)
    timestep_convention: str = "ddim"
    sampler: str = "ddim"
    # EDM (Karras et al. 2022): rho-schedule for timestep_spacing="karras", churn for heun.
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.007

    def __post_init__(self):
        check_choice("beta_schedule", self.beta_schedule, schedules.BETA_SCHEDULES)
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", self.timestep_spacing, schedules.SPACINGS)
        check_choice("timestep_convention", self.timestep_convention, schedules.CONVENTIONS)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_int("num_train_timesteps", self.num_train_timesteps, 2)
        check_int("steps_offset", self.steps_offset, 0)
        if not 0 < self.beta_start < self.beta_end < 1 and self.beta_schedule != "squaredcos_cap_v2":
            raise InvalidInputError(f"beta_start={self.beta_start}, beta_end={self.beta_end}; "
                                    "expected 0 < beta_start < beta_end < 1")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise InvalidInputError(
                "prediction_type='epsilon' with zero_terminal_snr=True: at abar = 0 an epsilon "
                "model carries no information about x0 (x0 = (x - s*eps)/0); use a v_prediction "
                "or sample model, or zero_terminal_snr=False")
        for name in ("rho", "s_noise"):
            check_real(name, getattr(self, name), low=0.0, low_open=True)
        check_real("s_churn", self.s_churn, low=0.0)
        if not 0 <= self.s_tmin <= self.s_tmax:
            raise InvalidInputError(f"s_tmin={self.s_tmin}, s_tmax={self.s_tmax}; "
                                    "expected 0 <= s_tmin <= s_tmax")
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name), low=0.0, low_open=True)

    def replace(self, **changes) -> "SamplerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def train_abar(self) -> torch.Tensor:
        """abar[t], t = 0..T-1, of the training schedule (float64)."""
        return schedules.train_abar(self.beta_schedule, self.num_train_timesteps,
                                    self.beta_start, self.beta_end, self.zero_terminal_snr)

    @classmethod
    def from_diffusers(cls, config, training_only: bool = False) -> "SamplerConfig":
        """From a diffusers scheduler, or its config dict (scheduler/scheduler_config.json).

        training_only=True keeps Lumen's sampling defaults (trailing DDIM) and reads only how the
        model was trained: beta schedule, T, prediction type and zero terminal SNR.
        """
        if hasattr(config, "config") and hasattr(config, "step"):
            config = dict(config.config, _class_name=type(config).__name__)
        if not isinstance(config, dict):
            raise InvalidTypeError(f"scheduler config of type {type(config).__name__}; expected "
                                   "a diffusers scheduler, its config dict, or SamplerConfig")
        fields = _training_fields(config)
        if not training_only:
            fields.update(_sampling_fields(config))
        return cls(**fields)


PRESETS = {
    # Lin et al. 2023: zero terminal SNR, v-prediction, trailing DDIM.
    "zero_snr": SamplerConfig(),
    # Stable Diffusion 1.x as shipped: the flawed setup the paper measures.
    "sd": SamplerConfig(zero_terminal_snr=False, prediction_type="epsilon",
                        timestep_spacing="leading", steps_offset=1),
}


def _training_fields(config: dict) -> dict:
    defaults = SamplerConfig()
    if config.get("trained_betas") is not None:
        raise InvalidInputError("scheduler config with trained_betas; expected a named beta_schedule "
                                f"(one of {', '.join(schedules.BETA_SCHEDULES)})")
    return {
        "num_train_timesteps": int(config.get("num_train_timesteps", defaults.num_train_timesteps)),
        "beta_schedule": config.get("beta_schedule", "linear"),
        "beta_start": float(config.get("beta_start", 0.0001)),
        "beta_end": float(config.get("beta_end", 0.02)),
        "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "prediction_type": config.get("prediction_type", "epsilon"),
    }


def _sampling_fields(config: dict) -> dict:
    name = config.get("_class_name", "DDIMScheduler")
    if name not in _DIFFUSERS_SAMPLERS:
        raise InvalidInputError(f"diffusers scheduler {name!r} has no Lumen equivalent; expected "
                                f"one of {sorted(_DIFFUSERS_SAMPLERS)} or a SamplerConfig")
    if name == "DPMSolverMultistepScheduler":
        solver = (config.get("algorithm_type", "dpmsolver++"), int(config.get("solver_order", 2)))
        if solver != ("dpmsolver++", 2):
            raise InvalidInputError(f"DPMSolverMultistepScheduler algorithm_type={solver[0]!r}, "
                                    f"solver_order={solver[1]}; expected 'dpmsolver++' of order 2")
    # diffusers' own default spacing per class, for configs that do not name one
    spacing = config.get("timestep_spacing", "leading" if name == "DDIMScheduler" else "linspace")
    if config.get("use_karras_sigmas", False):
        spacing = "karras"
    sampler, convention = _DIFFUSERS_SAMPLERS[name]
    return {"sampler": sampler, "timestep_spacing": spacing,
            "steps_offset": int(config.get("steps_offset", 0)),
            "timestep_convention": convention}
