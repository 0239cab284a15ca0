"""Shared fixtures: small models built from configs (random weights, nothing downloaded)."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU only under the interpreter, chosen when triton.jit decorates
    # them: set it before anything imports `kernels` (LUMEN_KERNELS=triton then selects them).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lumen import engine
from lumen.engine.models import Components
from lumen.engine.runtime import Engine

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
    """A perfect model: returns the exact v (or eps, or x0) for a fixed x0*, whatever x_t is.

    abar at a timestep is read from the training schedule; a continuous timestep (Karras
    spacing) interpolates log(sigma) linearly, the inverse of `timestep_for_sigma`.
    """

    def __init__(self, x0: torch.Tensor, config: engine.SamplerConfig):
        super().__init__()
        self.x0, self.prediction_type = x0, config.prediction_type
        self.abar_train = config.train_abar()
        self.config = SimpleNamespace(sample_size=x0.shape[-1], in_channels=x0.shape[1],
                                      cross_attention_dim=4)
        self.calls = 0

    def abar_at(self, t: float) -> float:
        abar = self.abar_train
        if t >= len(abar) - 1 and abar[-1] == 0:
            return 0.0
        log_sigma = (0.5 * ((1 - abar) / abar).log()).numpy()
        grid = np.arange(len(abar), dtype=np.float64)
        sigma = math.exp(np.interp(t, grid[np.isfinite(log_sigma)], log_sigma[np.isfinite(log_sigma)]))
        return 1 / (1 + sigma**2)

    def forward(self, x_t, t, emb=None):
        self.calls += 1
        abar = self.abar_at(float(t))
        a, s = math.sqrt(abar), math.sqrt(1 - abar)
        x0 = self.x0.to(x_t.dtype).expand_as(x_t)
        eps = (x_t - a * x0) / s
        return {"v_prediction": a * eps - s * x0, "epsilon": eps, "sample": x0}[self.prediction_type]


def oracle_engine(x0: torch.Tensor, config: engine.SamplerConfig, dtype=torch.float32):
    """An Engine around OracleUNet (no text encoder, no VAE)."""
    oracle = OracleUNet(x0, config)
    return Engine(Components(oracle), config, lambda x, t, emb: oracle(x, t, emb), torch.device("cpu"), dtype)


def make_tiny_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 12):
    """A real CLIPTokenizer over single letters, built offline (no merges: one token a letter)."""
    import json
    import tempfile

    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    folder = tempfile.mkdtemp()
    with open(f"{folder}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{folder}/merges.txt", "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", pad_token=pad_token,
                         model_max_length=model_max_length)


def make_tiny_clip(seed: int, projection_dim: int | None = None, hidden_size: int = 32):
    """A 2-layer random CLIP text encoder; with projection_dim, CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=55, hidden_size=hidden_size, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=12,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            projection_dim=projection_dim or hidden_size)
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config).eval()


def make_tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                         latent_channels=4, norm_num_groups=32, sample_size=16).eval()


def zero_snr_ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         rescale_betas_zero_snr=True, prediction_type="v_prediction",
                         timestep_spacing="trailing", clip_sample=False)


def make_tiny_pipeline(unet):
    """A StableDiffusionPipeline of tiny random parts: CLIP text encoder, character tokenizer, VAE."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=make_tiny_vae(), text_encoder=make_tiny_clip(1),
                                   tokenizer=make_tiny_tokenizer(), unet=unet, scheduler=zero_snr_ddim(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


SDXL_POOLED, SDXL_TIME_DIM = 16, 8


def make_tiny_sdxl_pipeline(force_zeros_for_empty_prompt: bool = True):
    """A StableDiffusionXLPipeline of tiny random parts: two CLIP encoders (32 + 32 features, the
    second projecting to 16), tokenizers padding with "<|endoftext|>" and "!" as SDXL's do,
    a text_time UNet with 64-dim context, a VAE."""
    from diffusers import StableDiffusionXLPipeline

    unet = make_tiny_unet(seed=3, cross_attention_dim=64, addition_embed_type="text_time",
                          addition_time_embed_dim=SDXL_TIME_DIM,
                          projection_class_embeddings_input_dim=SDXL_POOLED + 6 * SDXL_TIME_DIM)
    return StableDiffusionXLPipeline(
        vae=make_tiny_vae(), text_encoder=make_tiny_clip(4), text_encoder_2=make_tiny_clip(5, SDXL_POOLED),
        tokenizer=make_tiny_tokenizer(), tokenizer_2=make_tiny_tokenizer(pad_token="!"), unet=unet,
        scheduler=zero_snr_ddim(), force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The tiny pipeline saved as a local diffusers folder (model_index.json and subfolders)."""
    path = tmp_path_factory.mktemp("tiny_sd")
    make_tiny_pipeline(make_tiny_unet()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """The tiny SDXL pipeline saved as a local diffusers folder."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    make_tiny_sdxl_pipeline().save_pretrained(path)
    return path
