"""The one place that turns a model output into (x0, eps).

The math: docs/math.md#from-model-output-to-x0-and-eps.
"""
import torch


def to_x0_eps(m: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, s_t: torch.Tensor,
              prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from model output m at x_t = a_t*x0 + s_t*eps (a_t = sqrt(abar), s_t = sqrt(1-abar)).

    m, x_t: [B, C, H, W]; a_t, s_t: scalars or tensors broadcastable to m. v is never routed
    through eps, so v at abar = 0 gives x0 = -v and eps = x_t exactly.
    """
    if prediction_type == "v_prediction":
        return a_t * x_t - s_t * m, a_t * m + s_t * x_t
    if prediction_type == "epsilon":
        # Undefined at a_t = 0; SamplerConfig refuses epsilon with zero terminal SNR.
        return (x_t - s_t * m) / a_t, m
    if prediction_type == "sample":
        # s_t > 0 at every timestep a model is evaluated at (abar = 1 is only ever the target).
        return m, (x_t - a_t * m) / s_t
    raise ValueError(f"prediction_type={prediction_type!r}; expected v_prediction, epsilon or sample")
