"""Shared fixtures: small models built from configs (random weights, nothing downloaded)."""
import pytest
import torch

import engine
from engine.schedules import timestep_for_sigma

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32)


def make_tiny_unet(seed: int = 0, **overrides):
    """A small random-weight UNet2DConditionModel (4 channels, 8x8 latents, 32-dim context)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()


class OracleUNet(torch.nn.Module):
    """Returns the exact v (or eps, or x0) that a perfect model would for a fixed x0*.

    abar at the model's timestep is read from the training schedule, interpolating log(sigma)
    for the continuous timesteps of the Karras spacing.
    """

    def __init__(self, x0: torch.Tensor, config: engine.SamplerConfig):
        super().__init__()
        self.x0, self.prediction_type = x0, config.prediction_type
        self.abar_train = config.train_abar()

    def abar_at(self, t: torch.Tensor) -> torch.Tensor:
        T = len(self.abar_train)
        grid = torch.logspace(-4, 5, 20001, dtype=torch.float64)  # sigma grid, inverted below
        t_grid = timestep_for_sigma(grid, self.abar_train)
        t = float(t)
        if t >= T - 1:
            return self.abar_train[-1]
        if t == int(t):
            return self.abar_train[int(t)]
        sigma = float(torch.from_numpy(__import__("numpy").interp(t, t_grid.numpy(), grid.numpy())))
        return torch.tensor(1 / (1 + sigma**2), dtype=torch.float64)

    def forward(self, x_t, t, emb=None):
        abar = self.abar_at(t)
        a, s = abar.sqrt().float(), (1 - abar).sqrt().float()
        x0 = self.x0.expand_as(x_t)
        eps = (x_t - a * x0) / s
        return {"v_prediction": a * eps - s * x0, "epsilon": eps, "sample": x0}[self.prediction_type]
