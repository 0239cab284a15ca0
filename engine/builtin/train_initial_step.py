"""Train SingDiffusion's initial-step x0-predictor for the `flawed` built-in model
(docs/math.md#singdiffusions-initial-step).

    python -m lumen.engine.builtin.train_initial_step

Input: pure noise x_T and the flawed model's (frozen) text embeddings; target: x0; MSE, 10%
caption dropout. The MSE optimum is E[x0 | prompt], which the flawed model itself cannot reach
because it never trained at abar = 0 (Pang et al. 2024).
"""
import argparse
import json
import pathlib
import sys
from dataclasses import asdict, dataclass

import torch
from diffusers import UNet2DConditionModel

from . import WEIGHTS_DIR, model_dir, scenes, torch_threads
from .models import InitialStepPredictor, initial_step_config
from .text import load_text_encoder
from .train import RunConfig, drop_captions, fit


@dataclass(frozen=True)
class InitialStepConfig(RunConfig):
    """One training run of the x0-predictor (the shipped one's defaults)."""

    steps: int = 700
    warmup: int = 50
    ema_decay: float = 0.99


def initial_step_loss(predictor, encoder, x0: torch.Tensor, captions: list[str],
                      g: torch.Generator, caption_dropout: float) -> torch.Tensor:
    """MSE(f(x_T, text), x0) with x_T ~ N(0, I) independent of x0."""
    captions = drop_captions(captions, g, caption_dropout)
    with torch.no_grad():
        text = encoder.encode(captions)
    x_T = torch.randn(x0.shape, generator=g)
    return torch.nn.functional.mse_loss(predictor(x_T, text), x0)


def train(config: InitialStepConfig, encoder, log=print):
    """Train against a frozen encoder; returns (predictor with EMA weights, stats)."""
    with torch_threads(config.threads):  # the caller's count comes back after
        torch.manual_seed(config.seed)
        encoder.eval().requires_grad_(False)
        predictor = InitialStepPredictor(UNet2DConditionModel(**initial_step_config(encoder.dim, config.tiny)))
        size = predictor.unet.config.sample_size
        data_g = torch.Generator().manual_seed(config.seed)
        noise_g = torch.Generator().manual_seed(config.seed + 1)

        def batch_loss():
            x0, captions = scenes.sample_batch(config.batch_size, data_g, size)
            return initial_step_loss(predictor, encoder, x0, captions, noise_g, config.caption_dropout)

        stats = fit((predictor,), batch_loss, config, log, log_every=50)
        return predictor.eval(), stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=InitialStepConfig.steps)
    p.add_argument("--batch-size", type=int, default=InitialStepConfig.batch_size)
    p.add_argument("--seed", type=int, default=InitialStepConfig.seed)
    p.add_argument("--threads", type=int, default=InitialStepConfig.threads)
    p.add_argument("--out", type=pathlib.Path, default=WEIGHTS_DIR / "initial_step")
    args = p.parse_args(argv)
    config = InitialStepConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                               threads=args.threads)
    predictor, stats = train(config, load_text_encoder(model_dir("flawed")),
                             log=lambda m: print(m, flush=True))
    predictor.save_pretrained(args.out, text_encoder_of="flawed")
    record = {"command": "python -m lumen.engine.builtin.train_initial_step " + " ".join(sys.argv[1:]),
              "config": asdict(config), "data_seed": config.seed, "noise_seed": config.seed + 1,
              "init_seed": config.seed, "torch": torch.__version__, **stats}
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {args.out}: {json.dumps(stats)}", flush=True)


if __name__ == "__main__":
    main()
