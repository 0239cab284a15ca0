"""Brightness study: a flawed schedule draws medium brightness, zero terminal SNR the true range.

Reproduces the claim of Lin et al. (arXiv:2305.08891, Fig. 1-3) on the built-in models: for each
prompt, N seeds per setup, it measures per-image mean brightness and reports the fraction of
images in dark / medium / bright bins beside the training data's, plus SingDiffusion's
"average gray" for the extreme prompts. Writes brightness.md, brightness.json, brightness.png.

    python -m lumen.benchmarks.brightness --n 64 --out benchmarks/results
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lumen import engine
from lumen.engine.builtin import WEIGHTS_DIR, torch_threads
from lumen.engine.builtin.scenes import IMAGE_SIZE, caption_brightness
from lumen.engine.errors import InvalidInputError

PROMPTS = {
    "unspecific": "a red circle",
    "dark": "a blue square on a dark background",
    "bright": "a blue square on a bright background",
    "solid black": "solid black background",
    "solid white": "solid white background",
}
EXTREME = ("solid black", "solid white")
BINS = (1 / 3, 2 / 3)  # dark < 1/3 <= medium <= 2/3 < bright


@dataclass(frozen=True)
class Setup:
    """One row of the study: a built-in model, how it is sampled, and its guidance."""

    key: str  # what --setup names it by
    name: str
    model: str
    scheduler: engine.SamplerConfig | None
    guidance_rescale: float
    initial_step: bool = False


SETUPS = (
    Setup("flawed", "flawed, leading DDIM", "flawed", engine.PRESETS["sd"], 0.0),
    Setup("flawed-initial-step", "flawed + initial-step predictor", "flawed", engine.PRESETS["sd"], 0.0,
          initial_step=True),
    Setup("default", "default, trailing DDIM", "default", None, 0.0),
    Setup("default-rescale", "default, trailing DDIM, rescale 0.7", "default", None, 0.7),
)


def build_setup(setup: Setup) -> engine.Engine:
    """The engine of one row (built once, run for every prompt)."""
    initial = WEIGHTS_DIR / "initial_step" if setup.initial_step else None
    return engine.build(setup.model, scheduler=setup.scheduler, initial_step=initial, device="cpu")


def generate_images(eng: engine.Engine, setup: Setup, prompt: str, n: int, steps: int,
                    guidance: float) -> torch.Tensor:
    """Images [n, 3, H, W] in [0, 1] of n seeds (image i uses seed i)."""
    return eng.run(prompt=prompt, num_images_per_prompt=n, num_inference_steps=steps,
                   guidance_scale=guidance, guidance_rescale=setup.guidance_rescale,
                   generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="pt").images


def generate_brightness(eng: engine.Engine, setup: Setup, prompt: str, n: int, steps: int,
                        guidance: float) -> torch.Tensor:
    """Per-image mean brightness [n] in [0, 1] of n seeds (image i uses seed i)."""
    return generate_images(eng, setup, prompt, n, steps, guidance).mean(dim=(1, 2, 3))


def bin_fractions(values: torch.Tensor) -> dict:
    """Fractions of images in the dark, medium and bright bins."""
    dark = float((values < BINS[0]).float().mean())
    bright = float((values > BINS[1]).float().mean())
    return {"dark": dark, "medium": 1 - dark - bright, "bright": bright}


def noise_means(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Mean [n] of the initial noise x_T of seeds 0..n-1, drawn as the engine draws it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i)).mean()
                        for i in range(n)])


def split_by_noise_sign(values: torch.Tensor, means: torch.Tensor) -> dict:
    """Dark and bright fractions among the seeds whose x_T has a positive (negative) mean, and
    their average: the split post-stratified on that sign, whose true share is exactly 1/2.

    On a zero terminal SNR schedule the sign of mean(x_T) largely decides an unspecific
    prompt's background, so a seed set with more positive than negative means tilts the plain
    fraction by itself; the stratified split does not carry that tilt.
    """
    pos, neg = means > 0, means < 0
    if not pos.any() or not neg.any():
        raise InvalidInputError(f"{len(means)} seeds give x_T means of one sign only; expected n >= 2 "
                                "with both signs, to stratify on them")
    by_sign = {"pos": bin_fractions(values[pos]), "neg": bin_fractions(values[neg])}
    return {"positive_share": float(pos.float().mean()),
            **{f"{k}_if_{sign}": by_sign[sign][k] for sign in ("pos", "neg") for k in ("dark", "bright")},
            **{f"stratified_{k}": (by_sign["pos"][k] + by_sign["neg"][k]) / 2 for k in ("dark", "bright")}}


def run_study(n: int, steps: int, guidance: float, groups=tuple(PROMPTS), setups=SETUPS) -> dict:
    """{prompt group: {row name: {"values": [...], bins..., "mean": ...}}} for the given groups."""
    engines = {setup: build_setup(setup) for setup in setups}
    results = {}
    for group in groups:
        prompt = PROMPTS[group]
        rows = {"training data": caption_brightness(prompt, n=max(n, 1000))}
        for setup, eng in engines.items():
            start = time.perf_counter()
            rows[setup.name] = generate_brightness(eng, setup, prompt, n, steps, guidance)
            print(f"  {prompt!r}, {setup.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        results[group] = {name: {"values": v.tolist(), "mean": float(v.mean()), **bin_fractions(v)}
                          for name, v in rows.items()}
    means = noise_means(n, (3, IMAGE_SIZE, IMAGE_SIZE))
    for name, r in results.get("unspecific", {}).items():
        if name != "training data":
            r["by_noise_sign"] = split_by_noise_sign(torch.tensor(r["values"]), means)
    return results


def markdown(results: dict, n: int, steps: int, guidance: float) -> str:
    rows = list(next(iter(results.values())))
    lines = [f"Fractions of images per brightness bin (dark < 1/3 <= medium <= 2/3 < bright), "
             f"{n} seeds per cell, {steps} steps, guidance {guidance}; training data: 1000 draws.", "",
             "| prompt | setup | dark | medium | bright | mean |", "|---|---|---|---|---|---|"]
    for group, by_row in results.items():
        for name in rows:
            r = by_row[name]
            lines.append(f"| {PROMPTS[group]} | {name} | {r['dark']:.2f} | {r['medium']:.2f} | "
                         f"{r['bright']:.2f} | {r['mean']:.3f} |")
    if all(g in results for g in EXTREME):
        lines += ["", "SingDiffusion's average gray (mean grey level) for the extreme prompts:", "",
                  "| setup | " + " | ".join(PROMPTS[g] for g in EXTREME) + " |", "|---|---|---|"]
        for name in rows:
            lines.append(f"| {name} | " + " | ".join(f"{results[g][name]['mean']:.3f}" for g in EXTREME) + " |")
    if "unspecific" not in results:
        return "\n".join(lines) + "\n"
    split = {name: r["by_noise_sign"] for name, r in results["unspecific"].items() if "by_noise_sign" in r}
    share = next(iter(split.values()))["positive_share"]
    lines += ["", f'"{PROMPTS["unspecific"]}" by the sign of mean(x_T): seeds 0..{n - 1} have a positive '
              f"mean in {share:.1%} of cases, where the true share is 1/2. The stratified split averages "
              "the two halves:", "",
              "| setup | dark | bright | bright if mean(x_T) > 0 | bright if mean(x_T) < 0 "
              "| stratified dark | stratified bright |", "|---|---|---|---|---|---|---|"]
    for name, r in split.items():
        u = results["unspecific"][name]
        lines.append(f"| {name} | {u['dark']:.2f} | {u['bright']:.2f} | {r['bright_if_pos']:.2f} | "
                     f"{r['bright_if_neg']:.2f} | {r['stratified_dark']:.2f} | {r['stratified_bright']:.2f} |")
    return "\n".join(lines) + "\n"


def figure(results: dict, path: Path) -> None:
    """Brightness histograms per prompt and setup, plus logSNR and sqrt(abar) of both schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (group, by_row) in zip(axes.flat, results.items()):
        for name, r in by_row.items():
            ax.hist(r["values"], bins=20, range=(0, 1), histtype="step", density=True, label=name,
                    linewidth=2.5 if name == "training data" else 1.5)
        ax.set_title(f'"{PROMPTS[group]}"', fontsize=9)
        ax.set_xlabel("mean brightness")
    axes.flat[0].legend(fontsize=7)
    t = torch.arange(1000)
    for config, label in ((engine.PRESETS["sd"], "scaled_linear (flawed)"),
                          (engine.PRESETS["zero_snr"], "zero terminal SNR (default)")):
        abar = config.train_abar()
        axes.flat[5].plot(t, (abar / (1 - abar)).log(), label=label)
        axes.flat[6].plot(t, abar.sqrt(), label=label)
    axes.flat[5].set_title("logSNR(t)"), axes.flat[6].set_title("sqrt(abar_t)")
    axes.flat[5].legend(fontsize=7), axes.flat[6].legend(fontsize=7)
    axes.flat[7].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=64, help="seeds per prompt and setup")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompt", action="append", choices=list(PROMPTS), dest="groups",
                        help="only this prompt group (repeatable; default: all)")
    parser.add_argument("--setup", action="append", choices=[s.key for s in SETUPS], dest="setups",
                        help="only this setup (repeatable; default: all)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for .md, .json, .png")


@torch_threads(2)
def run(args) -> int:
    start = time.perf_counter()
    groups = tuple(dict.fromkeys(args.groups or PROMPTS))
    keys = set(args.setups or [s.key for s in SETUPS])
    results = run_study(args.n, args.steps, args.guidance, groups, tuple(s for s in SETUPS if s.key in keys))
    data = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "bins": BINS,
            "results": results}
    write_study(Path(args.out), "brightness", markdown(results, args.n, args.steps, args.guidance),
                data, lambda path: figure(results, path), time.perf_counter() - start)
    return 0


def write_study(out: Path, name: str, table: str, data: dict, draw, seconds: float) -> None:
    """out/name.md (the table, also printed), name.json (data) and name.png (draw(path))."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    draw(out / f"{name}.png")
    print(table)
    print(f"wrote {out}/{name}.md, .json, .png in {seconds:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
