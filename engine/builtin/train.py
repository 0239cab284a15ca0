"""Train a built-in model: text encoder + pixel UNet jointly on procedural scenes.

    python -m lumen.engine.builtin.train --variant default   # zero terminal SNR, v-prediction
    python -m lumen.engine.builtin.train --variant flawed    # SD schedule, epsilon

The shipped weights are five phases per variant, each continuing from the last
(`--init-from engine/builtin/weights/<variant>`; training.json keeps every phase): the commands
above; `--steps 800 --seed 1 --lr 5e-4 --warmup 50`; `--steps 2000 --seed 2 --lr 5e-4 --warmup 50`;
`--steps 6000 --seed 4 --lr 5e-4 --warmup 100 --ema-decay 0.999 --min-snr-gamma 5`;
`--steps 600 --seed 7 --lr 1e-4 --warmup 50 --ema-decay 0.999 --min-snr-gamma 5
--exact-below-snr 0.003 --exact-share 0.25 --exact-pool 32` (benchmarks/RESULTS.md#retraining-the-built-in-models
says why the last two; the exact targets change nothing on the flawed schedule).

The two variants share seed, data, architecture and step count; only the training schedule
and loss target differ (Lin et al. 2023 section 3: the flawed one never sees pure noise).
"""
import argparse
import json
import math
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from ..config import PRESETS, SamplerConfig
from ..errors import InvalidInputError
from ..prediction import to_x0_eps
from . import WEIGHTS_DIR, scenes, torch_threads
from .models import unet_config
from .text import LumenTextEncoder, WordTokenizer, load_text_encoder, save_text_model

VARIANTS = {"default": SamplerConfig(), "flawed": PRESETS["sd"]}
MAX_LENGTH = 10  # BOS + the longest caption (8 words) + slack


@dataclass(frozen=True)
class RunConfig:
    """What every training run of `fit` shares; defaults are the shipped models'."""

    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    threads: int = 1  # on the shared 2-core machine 2 threads ran 2.3x slower than 1
    tiny: bool = False  # a toy-sized model and 8x8 images, for tests

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise InvalidInputError(f"steps={self.steps}, batch_size={self.batch_size}; expected >= 1")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """One training run of a text encoder + UNet variant."""

    variant: str = "default"
    text_dim: int = 64
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE
    snr_floor: float = 0.0  # with min_snr_gamma: each x0 error counts at least this many times
    exact_below_snr: float = 0.0  # samples with SNR below this fit the data's exact posterior mean
    exact_share: float = 0.0  # share of each batch drawn from those timesteps
    exact_draws: int = 256  # renders per sample that estimate that mean
    exact_weight: float = 1.0  # how many times those samples' x0 error counts
    exact_pool: int = 1  # their error is averaged over pool x pool blocks before it is squared

    def __post_init__(self):
        super().__post_init__()
        unused = self.exact_below_snr == 0 and (self.exact_share > 0 or self.exact_weight != 1 or self.exact_pool != 1)
        if (self.exact_below_snr < 0 or not 0 <= self.exact_share <= 1 or self.exact_draws < 1 or unused
                or not self.exact_weight > 0 or self.exact_pool < 1 or self.image_size % self.exact_pool):
            raise InvalidInputError(f"exact_below_snr={self.exact_below_snr}, exact_share={self.exact_share}, "
                                    f"exact_draws={self.exact_draws}, exact_weight={self.exact_weight}, "
                                    f"exact_pool={self.exact_pool}; expected exact_below_snr >= 0, "
                                    "0 <= exact_share <= 1, exact_draws >= 1, exact_weight > 0 and "
                                    f"exact_pool >= 1 dividing the image size {self.image_size}; a share, "
                                    "weight or pool only with exact_below_snr > 0")
        if self.variant not in VARIANTS:
            raise InvalidInputError(f"variant={self.variant!r}; expected one of {sorted(VARIANTS)}")
        if self.snr_floor < 0 or (self.snr_floor > 0 and self.min_snr_gamma is None) or (
                self.min_snr_gamma is not None and self.snr_floor > self.min_snr_gamma):
            raise InvalidInputError(f"snr_floor={self.snr_floor} with min_snr_gamma={self.min_snr_gamma}; "
                                    "expected 0 <= snr_floor <= min_snr_gamma, and a floor only with a gamma")

    @property
    def image_size(self) -> int:
        return 8 if self.tiny else scenes.IMAGE_SIZE


def build_models(config: TrainConfig) -> tuple[LumenTextEncoder, UNet2DConditionModel]:
    """Freshly initialised encoder and UNet, seeded by config.seed."""
    torch.manual_seed(config.seed)
    tokenizer = WordTokenizer(scenes.vocabulary(), MAX_LENGTH)
    encoder = LumenTextEncoder(tokenizer, dim=16 if config.tiny else config.text_dim,
                               num_layers=1 if config.tiny else 2)
    unet = UNet2DConditionModel(**unet_config(encoder.dim, config.tiny))
    return encoder, unet


def drop_captions(captions: list[str], g: torch.Generator, p: float) -> list[str]:
    """Each caption replaced by "" (the unconditional prompt) with probability p, for CFG."""
    drop = torch.rand(len(captions), generator=g) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


@dataclass(frozen=True)
class ExactTargets:
    """Near-pure-noise samples fitted to the data's exact posterior mean E[x0 | x_t, caption].

    Below an SNR of a few thousandths x_t holds almost nothing of x0, so a sample's own x0 is a
    target with nearly the whole data spread as noise, while the posterior mean, the optimum of
    the same MSE, can be computed: the scenes are procedural, so `draws` fresh renders of the
    sample's caption (the whole data mix for "") estimate it by their Gaussian likelihood
    weights. Those samples' x0 error counts `weight` times, after it is averaged over
    `pool` x `pool` blocks (pool = 1: per pixel; pool = the image size: the mean colour alone);
    `share` of each batch has t drawn uniformly from those timesteps (the rest uniformly from all).
    """

    below_snr: float
    share: float
    draws: int
    generator: torch.Generator  # draws the renders; apart from the data and noise streams
    weight: float = 1.0
    pool: int = 1

    def error(self, x0_hat: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """weight x the mean squared pool x pool block average of x0_hat - means [k, C, H, W] -> [k]."""
        return self.weight * F.avg_pool2d(x0_hat - means, self.pool).pow(2).mean(dim=(1, 2, 3))

    def timesteps(self, abar: torch.Tensor) -> torch.Tensor:
        """The timesteps [k] of a schedule whose SNR is below below_snr (k may be 0)."""
        return (abar / (1 - abar) < self.below_snr).nonzero().flatten()


def posterior_mean(x_t: torch.Tensor, a: float, s: float, bank: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] [C, H, W] for x_t = a*x0 + s*eps with x0 uniform over bank [K, C, H, W]."""
    flat = bank.flatten(1)
    logits = (a * flat @ x_t.flatten() - 0.5 * a * a * flat.pow(2).sum(1)) / (s * s)
    return (logits.softmax(0) @ flat).view_as(x_t)


def render_bank(caption: str, n: int, g: torch.Generator, size: int) -> torch.Tensor:
    """n fresh renders [n, 3, size, size] of caption's scene; "" draws from the whole data mix."""
    if caption == "":
        return scenes.render(scenes.sample_scenes(n, g), g, size)
    return scenes.render([scenes.scene_of(caption)] * n, g, size)


def diffusion_loss(encoder, unet, x0: torch.Tensor, captions: list[str], abar: torch.Tensor,
                   prediction_type: str, g: torch.Generator, caption_dropout: float,
                   min_snr_gamma: float | None = None, snr_floor: float = 0.0,
                   exact: ExactTargets | None = None, controlnet=None,
                   control: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the model output against v = a*eps - s*x0 (or eps), t uniform in [0, T-1].

    x0: [B, 3, H, W]; abar: [T] float32; captions are replaced by "" with prob caption_dropout.
    min_snr_gamma: weight each sample so that its x0 error counts min(SNR, gamma) times
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"), and at
    least snr_floor times: clamp(SNR, snr_floor, gamma).
    exact: fit the samples below exact.below_snr to the exact posterior mean (ExactTargets).
    controlnet, control: a ControlNet and its control images [B, 3, H, W]; its residuals enter
    the UNet as in diffusers' ControlNet pipelines.
    """
    B = x0.shape[0]
    captions = drop_captions(captions, g, caption_dropout)
    t = torch.randint(0, abar.shape[0], (B,), generator=g)
    exact_steps = exact.timesteps(abar) if exact is not None else t[:0]
    n_drawn = round(exact.share * B) if len(exact_steps) else 0
    if n_drawn:
        pick = torch.randint(0, len(exact_steps), (n_drawn,), generator=exact.generator)
        t = torch.cat([t[:B - n_drawn], exact_steps[pick]])
    eps = torch.randn(x0.shape, generator=g)
    a, s = abar[t].sqrt().view(B, 1, 1, 1), (1 - abar[t]).sqrt().view(B, 1, 1, 1)
    x_t = a * x0 + s * eps
    targets = {"v_prediction": lambda: a * eps - s * x0, "epsilon": lambda: eps}
    if prediction_type not in targets:
        raise InvalidInputError(f"prediction_type={prediction_type!r}; expected one of {sorted(targets)}")
    target = targets[prediction_type]()
    context = encoder.encode(captions)
    residuals = {}
    if controlnet is not None:
        down, mid = controlnet(x_t, t, encoder_hidden_states=context, controlnet_cond=control,
                               return_dict=False)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out = unet(x_t, t, encoder_hidden_states=context, **residuals).sample
    per_sample = (out - target).pow(2).mean(dim=(1, 2, 3))  # [B]
    if min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(abar[t], prediction_type, min_snr_gamma, snr_floor)
    if len(exact_steps):
        chosen = torch.isin(t, exact_steps).nonzero().flatten().tolist()
        if chosen:
            x0_hat, _ = to_x0_eps(out[chosen], x_t[chosen], a[chosen], s[chosen], prediction_type)
            with torch.no_grad():
                means = torch.stack([posterior_mean(x_t[i], float(a[i]), float(s[i]),
                                                    render_bank(captions[i], exact.draws, exact.generator,
                                                                x0.shape[-1])) for i in chosen])
            per_sample = per_sample.index_put((torch.tensor(chosen),), exact.error(x0_hat, means))
    return per_sample.mean()


def min_snr_weight(abar_t: torch.Tensor, prediction_type: str, gamma: float,
                   floor: float = 0.0) -> torch.Tensor:
    """clamp(SNR, floor, gamma) over the factor by which the target's error counts the x0 error:
    SNR + 1 for v (x0 - x0_hat = s * (v_hat - v)), SNR for eps.

    Without a floor the weight of the near-pure-noise steps goes to 0 with their SNR, and on a
    zero terminal SNR schedule those are the steps that decide an image's background
    (benchmarks/RESULTS.md#retraining-the-built-in-models)."""
    snr = abar_t / (1 - abar_t)
    return snr.clamp(min=floor, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


class EMA:
    """Exponential moving average of parameters, with the usual (1+n)/(10+n) warm-up."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self, modules) -> None:
        for p, s in zip((p for m in modules for p in m.parameters()), self.shadow):
            p.copy_(s)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    u = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * u)))


def fit(modules, batch_loss, config, log, log_every: int) -> dict:
    """AdamW + warm-up/cosine lr + grad clip + EMA over config.steps; EMA weights copied in."""
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    ema = EMA(modules, config.ema_decay)
    losses, start = [], time.perf_counter()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            recent = losses[-log_every:]
            log(f"step {step + 1}/{config.steps} loss {sum(recent) / len(recent):.4f} "
                f"{time.perf_counter() - start:.0f}s")
    ema.copy_to(modules)
    tail = losses[-max(len(losses) // 10, 1):]
    return {"wall_time_s": round(time.perf_counter() - start, 1), "final_loss": losses[-1],
            "avg_loss_last_10pct": sum(tail) / len(tail), "avg_loss": sum(losses) / len(losses)}


def train(config: TrainConfig, log=print, init_from=None):
    """Train (from init_from's weights if given); returns (encoder, unet) with EMA weights, stats."""
    with torch_threads(config.threads):  # the caller's count comes back after
        encoder, unet = build_models(config)
        if init_from is not None:
            encoder.load_state_dict(load_text_encoder(init_from).state_dict())
            unet.load_state_dict(UNet2DConditionModel.from_pretrained(pathlib.Path(init_from) / "unet").state_dict())
        sampler_config = VARIANTS[config.variant]
        abar = sampler_config.train_abar().float()
        data_g = torch.Generator().manual_seed(config.seed)  # identical batches for every variant
        noise_g = torch.Generator().manual_seed(config.seed + 1)
        exact = None
        if config.exact_below_snr > 0:
            exact = ExactTargets(below_snr=config.exact_below_snr, share=config.exact_share, draws=config.exact_draws,
                                 generator=torch.Generator().manual_seed(config.seed + 2),
                                 weight=config.exact_weight, pool=config.exact_pool)
            steps = len(exact.timesteps(abar))
            log(f"exact posterior targets on the {steps} timesteps with SNR < {config.exact_below_snr}"
                + ("" if steps else f" (none: this schedule's lowest SNR is {float(abar[-1] / (1 - abar[-1])):.4g})"))

        def batch_loss():
            x0, captions = scenes.sample_batch(config.batch_size, data_g, config.image_size)
            return diffusion_loss(encoder, unet, x0, captions, abar, sampler_config.prediction_type,
                                  noise_g, config.caption_dropout, config.min_snr_gamma, config.snr_floor, exact)

        stats = fit((encoder, unet), batch_loss, config, log, log_every=100)
        return encoder.eval(), unet.eval(), stats


def scheduler_config(variant: str) -> dict:
    """diffusers DDIMScheduler config describing how `variant` was trained (and sampled)."""
    c = VARIANTS[variant]
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": c.num_train_timesteps,
            "beta_schedule": c.beta_schedule, "beta_start": c.beta_start, "beta_end": c.beta_end,
            "prediction_type": c.prediction_type, "rescale_betas_zero_snr": c.zero_terminal_snr,
            "timestep_spacing": c.timestep_spacing, "steps_offset": c.steps_offset,
            "clip_sample": False, "set_alpha_to_one": True}


def save_model(out_dir, encoder, unet, config: TrainConfig, stats: dict,
               previous: dict | None = None) -> None:
    """unet/, text_encoder/, tokenizer/, scheduler/ and training.json under out_dir.

    previous: the training.json of the run this one continued from (kept as "phases").
    """
    out_dir = pathlib.Path(out_dir)
    unet.save_pretrained(out_dir / "unet", safe_serialization=True)
    save_text_model(out_dir, encoder)
    (out_dir / "scheduler").mkdir(parents=True, exist_ok=True)
    (out_dir / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(config.variant), indent=1) + "\n")
    record = {"command": "python -m lumen.engine.builtin.train " + " ".join(sys.argv[1:]),
              "config": asdict(config), "data_seed": config.seed, "noise_seed": config.seed + 1,
              "init_seed": config.seed, "torch": torch.__version__, **stats}
    if previous is not None:
        phases = previous.pop("phases", [previous])
        record = {**record, "phases": phases + [dict(record)],
                  "total_steps": sum(r["config"]["steps"] for r in phases) + config.steps,
                  "total_wall_time_s": sum(r["wall_time_s"] for r in phases) + stats["wall_time_s"]}
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--ema-decay", type=float, default=TrainConfig.ema_decay)
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="Min-SNR-gamma loss weighting (e.g. 5); default: plain MSE")
    p.add_argument("--snr-floor", type=float, default=TrainConfig.snr_floor,
                   help="with --min-snr-gamma: each x0 error counts at least this many times (e.g. 1)")
    p.add_argument("--exact-below-snr", type=float, default=TrainConfig.exact_below_snr,
                   help="samples with SNR below this fit the data's exact posterior mean of x0 (e.g. 0.003)")
    p.add_argument("--exact-share", type=float, default=TrainConfig.exact_share,
                   help="with --exact-below-snr: share of each batch drawn from those timesteps (e.g. 0.25)")
    p.add_argument("--exact-draws", type=int, default=TrainConfig.exact_draws,
                   help="renders per sample that estimate that posterior mean")
    p.add_argument("--exact-weight", type=float, default=TrainConfig.exact_weight,
                   help="how many times those samples' x0 error counts (e.g. 0.1)")
    p.add_argument("--exact-pool", type=int, default=TrainConfig.exact_pool,
                   help="average those samples' x0 error over blocks of this many pixels a side before "
                        "squaring it (e.g. 32, the image size: the mean colour alone)")
    p.add_argument("--init-from", type=pathlib.Path, default=None,
                   help="continue from this model directory's weights (its training.json is kept)")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="output directory (default: engine/builtin/weights/<variant>)")
    args = p.parse_args(argv)
    # every option named after a TrainConfig field sets it; the rest keep their defaults
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    previous = None
    if args.init_from is not None:
        previous = json.loads((args.init_from / "training.json").read_text())
    encoder, unet, stats = train(config, lambda m: print(m, flush=True), args.init_from)
    out = args.out or WEIGHTS_DIR / args.variant
    save_model(out, encoder, unet, config, stats, previous)
    print(f"saved {out}: {json.dumps(stats)}", flush=True)


if __name__ == "__main__":
    main()
