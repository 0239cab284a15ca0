"""Inpainting and image-to-image on the built-in default model, scored by the scene analyzer.

Inpainting: the input is the prompt's own solid background, the mask a centred square; the run
must keep every unmasked pixel exactly and draw the prompt's shape, colour and background
(benchmarks/scene_analyzer.py), against text-to-image's rates for the same prompts and seeds.
Image-to-image: a white input under "a red circle on a solid black background" at strengths
0.25, 0.5, 0.75 and 1, the mean of the border pixels (the background) measured: how much of the
input each strength keeps. Writes inpaint.json, inpaint.md and image_to_image.png (the
README's before/after picture).

    lumen bench inpaint --n 16 --steps 25 --out benchmarks/results
"""
import json
import sys
import time
from pathlib import Path

import torch

from lumen import engine

from . import scene_analyzer
from .adherence import prompt_scene

PROMPTS = ("a green circle on a solid black background", "a blue square on a solid white background",
           "a yellow triangle on a solid black background", "a white triangle on a solid black background",
           "a black square on a solid white background", "a red circle on a solid white background")
MASK = (6, 26)  # the repainted square: rows and columns 6..25 of 32
IMG2IMG_PROMPT = "a red circle on a solid black background"
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
JUDGED = ("background", "color", "kind", "one shape")


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=16, help="seeds per prompt (image i uses seed i)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default=".", help="folder for inpaint.json, .md and the picture")


def background_of(prompt: str) -> float:
    return 0.0 if "solid black" in prompt else 1.0


def inputs(prompt: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [n, 3, 32, 32]: the prompt's solid background, mask [n, 1, 32, 32]: the square)."""
    image = torch.full((n, 3, 32, 32), background_of(prompt))
    mask = torch.zeros(n, 1, 32, 32)
    mask[..., MASK[0]:MASK[1], MASK[0]:MASK[1]] = 1.0
    return image, mask


def rates(images: torch.Tensor, prompt: str) -> dict:
    scene = prompt_scene(prompt)
    scores = [scene_analyzer.score(r, scene) for r in scene_analyzer.read_scenes(images)]
    out = {a: sum(s[a] for s in scores) / len(scores) for a in JUDGED}
    out["all correct"] = sum(all(s[a] for a in JUDGED) for s in scores) / len(scores)
    return out


def study(eng, n: int, steps: int) -> dict:
    rows = {}
    for prompt in PROMPTS:
        start = time.perf_counter()
        image, mask = inputs(prompt, n)
        kwargs = dict(num_inference_steps=steps, output_type="pt",
                      generator=[torch.Generator().manual_seed(i) for i in range(n)])
        painted = eng.run(prompt, image=image, mask_image=mask, strength=1.0,
                          num_images_per_prompt=n, **kwargs).images
        kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(n)]
        text = eng.run(prompt, num_images_per_prompt=n, **kwargs).images
        kept = (mask < 0.5).expand_as(image)
        rows[prompt] = {"inpaint": rates(painted, prompt), "text-to-image": rates(text, prompt),
                        "kept exactly": float((painted[kept] == image[kept]).float().mean()),
                        "samples": painted[:3], "text samples": text[:3]}
        print(f"  {prompt!r}: inpaint all correct {rows[prompt]['inpaint']['all correct']:.2f}, "
              f"text-to-image {rows[prompt]['text-to-image']['all correct']:.2f}, "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return rows


def img2img(eng, n: int, steps: int) -> dict:
    """Mean border level (the background) of a white input at each strength, and samples."""
    white = torch.ones(n, 3, 32, 32)
    out = {}
    for strength in STRENGTHS:
        images = eng.run(IMG2IMG_PROMPT, image=white, strength=strength, num_images_per_prompt=n,
                         num_inference_steps=steps, output_type="pt",
                         generator=[torch.Generator().manual_seed(i) for i in range(n)]).images
        border = torch.cat([images[..., :3, :].flatten(1), images[..., -3:, :].flatten(1)], dim=1)
        out[strength] = {"border level": float(border.mean()), "samples": images[:1]}
    return out


def figure(rows: dict, steps_by_strength: dict, path: Path) -> None:
    """Before/after: image-to-image from white at each strength; inpainting input, mask, results."""
    from PIL import Image, ImageDraw

    scale, pad = 4, 4
    tiles = [[torch.ones(3, 32, 32)] + [v["samples"][0] for v in steps_by_strength.values()]]
    prompt = PROMPTS[0]
    image, mask = inputs(prompt, 1)
    tiles.append([image[0], mask[0].expand(3, -1, -1), *rows[prompt]["samples"][:3]])
    width = max(len(r) for r in tiles) * (32 * scale + pad) + pad
    canvas = Image.new("RGB", (width, len(tiles) * (32 * scale + pad + 14) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    labels = [["white input", *(f"strength {s}" for s in steps_by_strength)],
              ["input", "mask (white repaints)", "inpaint 1", "inpaint 2", "inpaint 3"]]
    for r, row in enumerate(tiles):
        y = pad + r * (32 * scale + pad + 14)
        for c, tile in enumerate(row):
            x = pad + c * (32 * scale + pad)
            pixels = (tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(pixels).resize((32 * scale,) * 2, Image.NEAREST), (x, y + 14))
            draw.rectangle((x - 1, y + 13, x + 32 * scale, y + 14 + 32 * scale), outline=(160, 160, 160))
            draw.text((x, y), labels[r][c], fill=(0, 0, 0))
    canvas.save(path)


def markdown(rows: dict, strengths: dict, n: int, steps: int) -> str:
    lines = [f"Inpainting on the built-in default model: {n} seeds per prompt, {steps} steps, "
             f"strength 1, mask rows/columns {MASK[0]}-{MASK[1] - 1} of 32, input the prompt's "
             "solid background. Rates from the scene analyzer; text-to-image with the same seeds.",
             "", "| prompt | kept exactly | inpaint: all correct | colour | kind | one shape | "
             "background | text-to-image: all correct |", "|---|---|---|---|---|---|---|---|"]
    for prompt, row in rows.items():
        p, t = row["inpaint"], row["text-to-image"]
        lines.append(f"| {prompt} | {row['kept exactly']:.3f} | {p['all correct']:.2f} | "
                     f"{p['color']:.2f} | {p['kind']:.2f} | {p['one shape']:.2f} | "
                     f"{p['background']:.2f} | {t['all correct']:.2f} |")
    lines += ["", f"Image-to-image, a white input under {IMG2IMG_PROMPT!r}: mean border level "
              "(1 = the input's white, 0 = the prompt's black)", "",
              "| strength | border level |", "|---|---|"]
    lines += [f"| {s} | {v['border level']:.3f} |" for s, v in strengths.items()]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    started = time.perf_counter()
    eng = engine.build("default")
    rows = study(eng, args.n, args.steps)
    strengths = img2img(eng, args.n, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(rows, strengths, out / "image_to_image.png")
    text = markdown(rows, strengths, args.n, args.steps)
    (out / "inpaint.md").write_text(text)
    data = {"n": args.n, "steps": args.steps, "mask": MASK, "wall_s": time.perf_counter() - started,
            "inpaint": {p: {k: v for k, v in r.items() if "samples" not in k} for p, r in rows.items()},
            "image_to_image": {str(s): v["border level"] for s, v in strengths.items()}}
    (out / "inpaint.json").write_text(json.dumps(data, indent=1))
    print(text)
    print(f"wrote {out / 'inpaint.md'}, inpaint.json, image_to_image.png")
    return 0
