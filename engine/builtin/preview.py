"""Sample a built-in model into a PNG grid, to check by eye that images match their prompts.

    python -m engine.builtin.preview --model default --out /tmp/lumen_default.png

Rows are prompts, columns are seeds. Uses Lumen's own samplers (trailing DDIM for `default`,
the SD setup for `flawed`), CFG with rescale in the v/eps space the model predicts.
"""
import argparse
import json
import pathlib

import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from ..config import SamplerConfig
from ..guidance import guide
from ..prediction import to_x0_eps
from ..samplers import make_plan, sample
from . import MODEL_NAMES, WEIGHTS_DIR, model_dir
from .models import load_initial_step
from .scenes import brightness
from .text import load_text_encoder

PROMPTS = ("a red circle", "a red circle on a solid black background",
           "a red circle on a solid white background", "a blue square on a dark background",
           "a blue square on a bright background", "a green triangle", "a yellow square",
           "solid black background", "solid white background",
           "a white circle on a solid black background")


def load_model(directory):
    """(text encoder, UNet, SamplerConfig read from scheduler/scheduler_config.json)."""
    directory = pathlib.Path(directory)
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(directory / "unet").eval()
    return load_text_encoder(directory), unet, SamplerConfig.from_diffusers(scheduler)


@torch.no_grad()
def generate(encoder, unet, config: SamplerConfig, prompts: list[str], seed: int = 0,
             steps: int = 25, guidance_scale: float = 7.5, guidance_rescale: float = 0.7,
             initial_step=None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1]; DDIM eta = 0, CFG batch order [uncond, cond].

    initial_step: a SingDiffusion x0-predictor (conditional only) replacing x_T by its forward
    diffusion to the first timestep.
    """
    B, size = len(prompts), unet.config.sample_size
    plan = make_plan(config, steps, eta=0.0).to("cpu")
    pos, neg = encoder.encode(prompts), encoder.encode([""] * B)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(B, 3, size, size, generator=g)
    noise = torch.randn(B, plan.plan.num_steps, 3, size, size, generator=g)

    def denoise(x, k):
        m = unet(torch.cat([x, x]), plan.timesteps[k], encoder_hidden_states=torch.cat([neg, pos])).sample
        m_neg, m_pos = m.chunk(2)
        return to_x0_eps(guide(m_neg, m_pos, guidance_scale, guidance_rescale), x,
                         plan.a[k], plan.s[k], config.prediction_type)

    if initial_step is not None:
        # SingDiffusion hand-over (SPEC 8): start from a*x0_hat + s*x_T at the first timestep.
        x_T = plan.a[0] * initial_step(x_T, pos) + plan.s[0] * x_T
    return sample(denoise, x_T, plan, noise).clamp(-1, 1)


def save_grid(images: torch.Tensor, rows: int, path, scale: int = 4) -> None:
    """images [rows*cols, 3, H, W] in [-1, 1] -> PNG, row-major, upscaled `scale`x (nearest)."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    grid = grid.view(rows, cols, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, 3)
    Image.fromarray(grid.numpy()).resize((cols * w * scale, rows * h * scale), Image.NEAREST).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help=f"one of {MODEL_NAMES} or a directory")
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--guidance-rescale", type=float, default=0.7)
    p.add_argument("--initial-step", action="store_true", help="SingDiffusion first step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    directory = model_dir(args.model) if args.model in MODEL_NAMES else args.model
    encoder, unet, config = load_model(directory)
    prompts = [q for q in PROMPTS for _ in range(args.seeds)]
    initial = load_initial_step(WEIGHTS_DIR / "initial_step") if args.initial_step else None
    images = generate(encoder, unet, config, prompts, 0, args.steps, args.guidance_scale,
                      args.guidance_rescale, initial)
    save_grid(images, len(PROMPTS), args.out)
    for i, prompt in enumerate(PROMPTS):
        b = brightness(images[i * args.seeds:(i + 1) * args.seeds])
        print(f"{prompt:45s} brightness {b.mean():.3f} (min {b.min():.3f}, max {b.max():.3f})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
