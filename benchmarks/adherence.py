"""Prompt adherence: how often the built-in models draw the background, colour, shape asked for.

In the spirit of GenEval (Ghosh et al. 2023) but exact, because the scenes are procedural: for
a fixed list of colour x shape x background prompts, N seeds per setup (image i uses seed i),
each image is scored by benchmarks/scene_analyzer.py on background range, shape colour, shape
kind and "exactly one shape", plus "all correct". The analyzer is validated on rendered
training scenes first, every run; an attribute it judges below REQUIRED_ACCURACY there is
reported but left out of "all correct". Writes adherence.md, adherence.json, adherence.png.

    lumen bench adherence --model both --n 32 --steps 25 --out benchmarks/results
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from lumen.engine.builtin import scenes, torch_threads
from lumen.engine.errors import InvalidInputError
from lumen.engine.validation import check_choice, check_int, check_real

from . import scene_analyzer
from .brightness import SETUPS as BRIGHTNESS_SETUPS
from .brightness import Setup, build_setup, generate_images, write_study

# Each colour twice, each shape four times, each background class two or three times.
PROMPTS = (
    "a red circle",
    "a red square on a dark background",
    "a green triangle on a bright background",
    "a green circle on a solid black background",
    "a blue square on a solid white background",
    "a blue triangle on a dark background",
    "a yellow circle on a bright background",
    "a yellow triangle on a solid black background",
    "a white square on a dark background",
    "a white triangle on a solid black background",
    "a black circle on a bright background",
    "a black square on a solid white background",
)
SETUPS = tuple(s for s in BRIGHTNESS_SETUPS if not s.initial_step)
MODELS = ("default", "flawed", "both")
REQUIRED_ACCURACY = 0.98  # the analyzer's accuracy on training scenes, per attribute
VALIDATION_SCENES = 1000
GRID_SEEDS = 3  # samples per prompt and setup in the PNG
GRID_UPSCALE = 2


def prompt_scene(prompt: str) -> scenes.Scene:
    """The data's scene of a prompt; only captions with a shape can be scored."""
    for scene in scenes.all_scenes():
        if scene.caption == prompt and scene.shape is not None:
            return scene
    raise InvalidInputError(f"prompt {prompt!r} is not a caption with a shape; expected one like "
                            f"{PROMPTS[1]!r}")


def held_out(prompts) -> list[str]:
    """The prompts whose caption the training data never draws (weight 0 in scene_weights)."""
    data = scenes.all_scenes()
    drawn = {s.caption for s, w in zip(data, scenes.scene_weights(data).tolist()) if w > 0}
    return [p for p in prompts if p not in drawn]


def validation() -> dict:
    """The analyzer's accuracy on rendered training scenes and the attributes it may judge."""
    accuracy = scene_analyzer.validate(VALIDATION_SCENES, seed=0)
    judged = [a for a in scene_analyzer.ATTRIBUTES if accuracy[a] >= REQUIRED_ACCURACY]
    return {"scenes": VALIDATION_SCENES, "accuracy": accuracy, "required": REQUIRED_ACCURACY,
            "judged": judged, "not judged": [a for a in accuracy if a not in judged]}


def score_images(images: torch.Tensor, scene: scenes.Scene, judged: list[str]) -> dict:
    """Fractions of images correct per attribute and on every judged one, plus each reading."""
    readings = scene_analyzer.read_scenes(images)
    scores = [scene_analyzer.score(r, scene) for r in readings]
    fractions = {a: sum(s[a] for s in scores) / len(scores) for a in scene_analyzer.ATTRIBUTES}
    fractions["all correct"] = sum(all(s[a] for a in judged) for s in scores) / len(scores)
    return {**fractions, "readings": [vars(r) for r in readings]}


def overall(by_prompt: dict) -> dict:
    """Mean over prompts of each fraction (every prompt has the same number of seeds)."""
    keys = (*scene_analyzer.ATTRIBUTES, "all correct")
    return {k: sum(r[k] for r in by_prompt.values()) / len(by_prompt) for k in keys}


def run_setup(setup: Setup, prompts, n: int, steps: int, guidance: float,
              judged: list[str]) -> tuple[dict, dict]:
    """({prompt: scores}, {prompt: the first GRID_SEEDS images}) of one setup."""
    eng = build_setup(setup)
    by_prompt, samples = {}, {}
    for prompt in prompts:
        start = time.perf_counter()
        images = generate_images(eng, setup, prompt, n, steps, guidance)
        by_prompt[prompt] = score_images(images, prompt_scene(prompt), judged)
        samples[prompt] = images[:GRID_SEEDS]
        print(f"  {prompt!r}, {setup.name}: all correct {by_prompt[prompt]['all correct']:.2f}, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return by_prompt, samples


def markdown(data: dict) -> str:
    check = data["validation"]
    accuracy = ", ".join(f"{a} {v:.3f}" for a, v in check["accuracy"].items())
    not_judged = (f"; not judged (below {check['required']}): {', '.join(check['not judged'])}"
                  if check["not judged"] else "")
    lines = [f"Prompt adherence, {data['n']} seeds per prompt and setup, {data['steps']} steps, "
             f"guidance {data['guidance']}, {len(data['prompts'])} prompts.",
             f"Analyzer accuracy on {check['scenes']} rendered training scenes: {accuracy}"
             f"{not_judged}.",
             f"Held out from training: {', '.join(data['held out']) or 'none (the data draws every caption)'}.",
             "", "| setup | " + " | ".join((*scene_analyzer.ATTRIBUTES, "all correct")) + " |",
             "|---" * (len(scene_analyzer.ATTRIBUTES) + 2) + "|"]
    for name, result in data["results"].items():
        cells = " | ".join(f"{v:.2f}" for v in result["overall"].values())
        lines.append(f"| {name} | {cells} |")
    names = list(data["results"])
    lines += ["", "All correct, per prompt:", "", "| prompt | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for prompt in data["prompts"]:
        cells = " | ".join(f"{data['results'][n]['prompts'][prompt]['all correct']:.2f}" for n in names)
        lines.append(f"| {prompt} | {cells} |")
    return "\n".join(lines) + "\n"


def figure(samples: dict, path: Path) -> None:
    """A grid: one row per prompt, GRID_SEEDS nearest-upscaled samples per setup side by side."""
    from PIL import Image, ImageDraw

    names, prompts = list(samples), list(next(iter(samples.values())))
    cell, gap, label = scenes.IMAGE_SIZE * GRID_UPSCALE + 2, 8, 250
    width = label + len(names) * (GRID_SEEDS * cell + gap)
    grid = Image.new("RGB", (width, 14 + len(prompts) * cell), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((label + j * (GRID_SEEDS * cell + gap), 1), name, fill=(0, 0, 0))
    for i, prompt in enumerate(prompts):
        y = 14 + i * cell
        draw.text((4, y + cell // 3), prompt, fill=(0, 0, 0))
        for j, name in enumerate(names):
            for k, image in enumerate(samples[name][prompt]):
                pixels = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
                tile = Image.fromarray(pixels).resize((cell - 2, cell - 2), Image.NEAREST)
                grid.paste(tile, (label + j * (GRID_SEEDS * cell + gap) + k * cell, y))
    grid.save(path, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="both", help="default, flawed or both")
    parser.add_argument("--n", type=int, default=32, help="seeds per prompt and setup")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS),
                        help="captions with a shape (default: the fixed list)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for .md, .json, .png")


def check_args(args) -> None:
    check_choice("model", args.model, MODELS)
    check_int("n", args.n, 1)
    check_int("steps", args.steps, 1)
    check_real("guidance", args.guidance, 1.0, 100.0)
    for prompt in args.prompts:
        prompt_scene(prompt)


@torch_threads(2)
def run(args) -> int:
    check_args(args)
    start = time.perf_counter()
    check = validation()
    print(f"analyzer on {check['scenes']} training scenes: " +
          ", ".join(f"{a} {v:.3f}" for a, v in check["accuracy"].items()), flush=True)
    setups = [s for s in SETUPS if args.model in ("both", s.model)]
    results, samples = {}, {}
    for setup in setups:
        by_prompt, samples[setup.name] = run_setup(setup, args.prompts, args.n, args.steps,
                                                   args.guidance, check["judged"])
        results[setup.name] = {"model": setup.model, "guidance_rescale": setup.guidance_rescale,
                               "overall": overall(by_prompt), "prompts": by_prompt}
    data = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "prompts": args.prompts,
            "held out": held_out(args.prompts), "validation": check, "results": results,
            "wall_time_s": round(time.perf_counter() - start, 1)}
    write_study(Path(args.out), "adherence", markdown(data), data,
                lambda path: figure(samples, path), data["wall_time_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
