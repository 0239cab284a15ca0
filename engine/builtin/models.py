"""Architectures of the built-in models: the pixel-space UNet and SingDiffusion's x0-predictor."""
import json
import pathlib

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..errors import InvalidInputError
from .scenes import IMAGE_SIZE


def unet_config(cross_attention_dim: int, tiny: bool = False) -> dict:
    """UNet2DConditionModel kwargs: RGB pixels; attention only at 8x8 (tiny: 4x4), for CPU cost."""
    if tiny:
        return dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                    block_out_channels=(8, 16), norm_num_groups=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    return dict(sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 64), norm_num_groups=16,
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=cross_attention_dim, attention_head_dim=8)


def initial_step_config(cross_attention_dim: int, tiny: bool = False) -> dict:
    """A narrower UNet for the time-independent x0-predictor (its target is a blurry mean)."""
    config = unet_config(cross_attention_dim, tiny)
    if not tiny:
        config.update(block_out_channels=(16, 32, 64), norm_num_groups=8)
    return config


class InitialStepPredictor(nn.Module):
    """SingDiffusion (Pang et al. 2024): x0_hat = f(x_T, prompt), no timestep input.

    The math: docs/math.md#singdiffusions-initial-step.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, x_T: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """x_T: [B, 3, H, W] pure noise; encoder_hidden_states: [B, L, D] -> x0_hat [B, 3, H, W]."""
        t = torch.zeros((), device=x_T.device)  # constant: the UNet's time input is unused
        return self.unet(x_T, t, encoder_hidden_states=encoder_hidden_states).sample

    def save_pretrained(self, directory, text_encoder_of: str) -> None:
        """unet/ plus config.json naming the model whose text encoder conditions it."""
        directory = pathlib.Path(directory)
        self.unet.save_pretrained(directory / "unet")
        config = {"_class_name": "LumenInitialStep", "text_encoder_of": text_encoder_of,
                  "target": "x0", "timestep": "T"}
        (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def load_initial_step(model_dir) -> InitialStepPredictor:
    """The SingDiffusion x0-predictor saved under model_dir (e.g. weights/initial_step)."""
    model_dir = pathlib.Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("_class_name") != "LumenInitialStep":
        raise InvalidInputError(f"{model_dir}/config.json has _class_name="
                                f"{config.get('_class_name')!r}; expected 'LumenInitialStep'")
    return InitialStepPredictor(UNet2DConditionModel.from_pretrained(model_dir / "unet")).eval()
