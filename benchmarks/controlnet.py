"""ControlNet study: does the built-in default model's ControlNet put the shape where the control
image says?

For each prompt of the adherence study, N seeds: a control mask is rendered for the prompt's
scene with its own generator (seeds apart from training's), the model draws the prompt with that
mask as the control image, and benchmarks/scene_analyzer.py reads the image: a hit is the drawn
shape's centroid lying on the control mask. The same prompts and seeds without the control
give the chance level, and adherence (background, colour, kind, one shape) is scored for both.
Writes controlnet.md, controlnet.json, controlnet.png.

    lumen bench controlnet --n 16 --out benchmarks/results
"""
import json
import time
from pathlib import Path

import torch

from lumen import engine
from lumen.engine.builtin import scenes, torch_threads
from lumen.engine.builtin.train_controlnet import CONTROLNET_DIR, control_images
from lumen.engine.validation import check_int, check_real

from . import adherence, scene_analyzer

SEED_BASE = 100_000  # control masks and sampling seeds: far from the training data's streams
REQUIRED = 0.9  # the share of hits the built-in ControlNet must reach


def control_for(prompt: str, n: int, seed: int) -> torch.Tensor:
    """n control masks [n, 1, H, W] of the prompt's scene, drawn at random places."""
    scene = adherence.prompt_scene(prompt)
    _, masks = scenes.render([scene] * n, torch.Generator().manual_seed(seed), masks=True)
    return masks


def run_study(n: int, steps: int, guidance: float, scale: float, prompts=adherence.PROMPTS) -> dict:
    eng = engine.build("default", controlnet=CONTROLNET_DIR, device="cpu")
    judged = adherence.validation()["judged"]
    results, samples = {}, {}
    for k, prompt in enumerate(prompts):
        masks = control_for(prompt, n, SEED_BASE + k)
        runs = {}
        for name, control in (("controlled", control_images(masks)), ("plain", None)):
            generators = [torch.Generator().manual_seed(SEED_BASE + 1000 * k + i) for i in range(n)]
            images = eng.run(prompt, num_images_per_prompt=n, num_inference_steps=steps,
                             guidance_scale=guidance, guidance_rescale=0.7, generator=generators,
                             control_image=control, controlnet_conditioning_scale=scale,
                             output_type="pt").images
            readings = scene_analyzer.read_scenes(images)
            hits = [scene_analyzer.inside(r, m[0]) for r, m in zip(readings, masks)]
            runs[name] = {"location": sum(hits) / n,
                          **{a: v for a, v in adherence.score_images(
                              images, adherence.prompt_scene(prompt), judged).items()
                             if a != "readings"}}
            if name == "controlled":
                samples[prompt] = (masks[:3], images[:3])
        results[prompt] = runs
        print(f"  {prompt!r}: location {runs['controlled']['location']:.2f} with the control, "
              f"{runs['plain']['location']:.2f} without", flush=True)
    overall = {name: {key: sum(r[name][key] for r in results.values()) / len(results)
                      for key in ("location", "all correct", *scene_analyzer.ATTRIBUTES)}
               for name in ("controlled", "plain")}
    return {"results": results, "overall": overall, "samples": samples}


def markdown(data: dict) -> str:
    o = data["overall"]
    lines = [f"Built-in default model + its ControlNet, {data['n']} seeds per prompt, "
             f"{len(data['results'])} prompts, {data['steps']} steps, guidance {data['guidance']}, "
             f"rescale 0.7, conditioning scale {data['scale']}. Analyzer location accuracy on "
             f"rendered scenes: {data['analyzer_location']:.3f}.", "",
             "| run | shape centroid on the control mask | all correct | background | colour | "
             "kind | one shape |", "|---|---|---|---|---|---|---|"]
    for name in ("controlled", "plain"):
        r = o[name]
        lines.append(f"| {name} | {r['location']:.3f} | {r['all correct']:.3f} | "
                     f"{r['background']:.3f} | {r['color']:.3f} | {r['kind']:.3f} | "
                     f"{r['one shape']:.3f} |")
    lines += ["", "| prompt | location with / without the control |", "|---|---|"]
    lines += [f"| {p} | {r['controlled']['location']:.2f} / {r['plain']['location']:.2f} |"
              for p, r in data["results"].items()]
    return "\n".join(lines) + "\n"


def figure(samples: dict, path: Path) -> None:
    """Per prompt: three control masks, each above the image drawn with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = list(samples)[:6]
    cols = min(3, len(samples[prompts[0]][0]))
    fig, axes = plt.subplots(2 * len(prompts), cols, figsize=(1.5 * cols, 3 * len(prompts)),
                             squeeze=False)
    for row, prompt in enumerate(prompts):
        masks, images = samples[prompt]
        for col in range(cols):
            axes[2 * row, col].imshow(masks[col, 0], cmap="gray", vmin=0, vmax=1)
            axes[2 * row + 1, col].imshow(images[col].permute(1, 2, 0).clamp(0, 1))
        axes[2 * row, 0].set_title(prompt, fontsize=6, loc="left")
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=16, help="seeds per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    parser.add_argument("--out", default="benchmarks/results", help="folder for .md, .json, .png")


@torch_threads(2)
def run(args) -> int:
    check_int("n", args.n, 1)
    check_int("steps", args.steps, 1)
    check_real("guidance", args.guidance, 1.0, 100.0)
    check_real("scale", args.scale, 0.0, 10.0)
    start = time.perf_counter()
    data = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "scale": args.scale,
            "analyzer_location": scene_analyzer.validate_location(),
            **run_study(args.n, args.steps, args.guidance, args.scale)}
    samples = data.pop("samples")
    data["wall_time_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "controlnet.md").write_text(markdown(data))
    (out / "controlnet.json").write_text(json.dumps(data, indent=1))
    figure(samples, out / "controlnet.png")
    print(markdown(data))
    print(f"wrote {out}/controlnet.md, .json, .png in {data['wall_time_s']:.0f} s")
    return 0
