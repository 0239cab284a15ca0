"""Train the built-in default model's ControlNet: a shape mask says where the shape goes.

    python -m lumen.engine.builtin.train_controlnet --steps 1500

ControlNetModel.from_unet copies the default model's UNet (its zero convolutions start the
residuals at zero); the UNet and the text encoder stay frozen. Each batch is the default
model's training data (engine/builtin/scenes.py) with each image's shape coverage as the
control image (white shape on black, three channels; zero for background-only images), and the
default model's loss (v-prediction on its zero terminal SNR schedule, captions dropped at 10%
for CFG). Writes engine/builtin/weights/default/controlnet/ (config, weights, training.json).
"""
import argparse
import json
import pathlib
import sys
from dataclasses import asdict, dataclass, fields

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from . import WEIGHTS_DIR, scenes, torch_threads
from .text import load_text_encoder
from .train import VARIANTS, RunConfig, diffusion_loss, fit

CONTROLNET_DIR = WEIGHTS_DIR / "default" / "controlnet"


@dataclass(frozen=True)
class ControlConfig(RunConfig):
    """One training run of the default model's ControlNet."""

    embedding: tuple[int, ...] = (16,)  # the control image's embedding: pixels, no downsampling


def control_images(masks: torch.Tensor) -> torch.Tensor:
    """Shape coverage [B, 1, H, W] as the control image [B, 3, H, W] in [0, 1]."""
    return masks.expand(-1, 3, -1, -1)


def sample_batch(batch_size: int, generator: torch.Generator, size: int):
    """(images [B, 3, H, W] in [-1, 1], captions, control images [B, 3, H, W] in [0, 1])."""
    chosen = scenes.sample_scenes(batch_size, generator)
    images, masks = scenes.render(chosen, generator, size, masks=True)
    return images, [s.caption for s in chosen], control_images(masks)


def train(config: ControlConfig, model_dir: pathlib.Path = WEIGHTS_DIR / "default", log=print):
    """The trained ControlNet (EMA weights) and the run's stats."""
    with torch_threads(config.threads):  # the caller's count comes back after
        encoder = load_text_encoder(model_dir).eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval().requires_grad_(False)
        torch.manual_seed(config.seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=config.embedding,
                                        conditioning_channels=3).train()
        sampler = VARIANTS["default"]
        abar = sampler.train_abar().float()
        data_g = torch.Generator().manual_seed(config.seed)
        noise_g = torch.Generator().manual_seed(config.seed + 1)
        size = 8 if config.tiny else scenes.IMAGE_SIZE

        def batch_loss():
            x0, captions, control = sample_batch(config.batch_size, data_g, size)
            return diffusion_loss(encoder, unet, x0, captions, abar, sampler.prediction_type, noise_g,
                                  config.caption_dropout, controlnet=net, control=control)

        stats = fit((net,), batch_loss, config, log, log_every=100)
        return net.eval(), stats


def save(net, out: pathlib.Path, config: ControlConfig, stats: dict) -> None:
    net.save_pretrained(out, safe_serialization=True)
    record = {"command": "python -m lumen.engine.builtin.train_controlnet " + " ".join(sys.argv[1:]),
              "config": asdict(config), "data_seed": config.seed, "noise_seed": config.seed + 1,
              "init": "ControlNetModel.from_unet(default unet)", "torch": torch.__version__, **stats}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(ControlConfig):
        if f.name in ("tiny", "embedding"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--out", type=pathlib.Path, default=CONTROLNET_DIR)
    args = p.parse_args(argv)
    config = ControlConfig(**{f.name: getattr(args, f.name) for f in fields(ControlConfig)
                              if hasattr(args, f.name)})
    net, stats = train(config, log=lambda m: print(m, flush=True))
    save(net, args.out, config, stats)
    print(f"saved {args.out}: {json.dumps(stats)}", flush=True)


if __name__ == "__main__":
    main()
