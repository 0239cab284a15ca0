"""UNet shape presets: the real configs of SD1.5, SD2.1 and SDXL base, built with random weights.

Configs are those of the published `unet/config.json` files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0); nothing is
downloaded. `small` is a 1M-parameter UNet of the same family for CPU runs, `small_xl` the
same size with SDXL's added conditioning.
"""
from dataclasses import dataclass, field

import torch

_SD_BLOCKS = dict(
    layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
    norm_eps=1e-5, act_fn="silu", center_input_sample=False, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@dataclass(frozen=True)
class Preset:
    """A UNet config plus what a request to it looks like."""

    name: str
    unet: dict = field(repr=False)
    vae_factor: int = 8  # pixels per latent cell of the model's VAE
    seq_len: int = 77  # text tokens
    pooled_dim: int | None = None  # SDXL's pooled text embedding width

    @property
    def default_size(self) -> int:
        """The native resolution in pixels."""
        return self.unet["sample_size"] * self.vae_factor

    def build(self, device="cpu", dtype=torch.float32, seed: int = 0):
        """A random-weight UNet2DConditionModel, initialised directly on device."""
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        with torch.device(device):
            unet = UNet2DConditionModel(**self.unet)
        cast = {torch.float16: unet.half, torch.bfloat16: unet.bfloat16}.get(dtype, unet.float)
        return cast().eval().requires_grad_(False)

    def num_parameters(self) -> int:
        """Exact parameter count, from a weightless (meta-device) instance."""
        return sum(p.numel() for p in self.build("meta").parameters())


PRESETS = {p.name: p for p in (
    Preset("small", dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64, 64), norm_num_groups=8,
                         cross_attention_dim=64, attention_head_dim=8,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                           "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D",
                                         "CrossAttnUpBlock2D"))),
    Preset("sd15", dict(_SD_BLOCKS, sample_size=64, in_channels=4, out_channels=4,
                        cross_attention_dim=768, attention_head_dim=8)),
    Preset("sd21", dict(_SD_BLOCKS, sample_size=96, in_channels=4, out_channels=4,
                        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                        use_linear_projection=True, upcast_attention=True)),
    Preset("sdxl", dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                        block_out_channels=(320, 640, 1280), norm_num_groups=32,
                        cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                        transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                        addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                          "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                        "UpBlock2D")),
           pooled_dim=1280),
    # small with SDXL's added conditioning (pooled text embedding + time ids), for CPU runs
    Preset("small_xl", dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                            block_out_channels=(32, 64), norm_num_groups=8,
                            cross_attention_dim=64, attention_head_dim=8,
                            use_linear_projection=True, addition_embed_type="text_time",
                            addition_time_embed_dim=8,
                            projection_class_embeddings_input_dim=32 + 6 * 8,
                            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
           seq_len=7, pooled_dim=32),
)}
