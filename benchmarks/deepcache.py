"""DeepCache study: what skipping the deep blocks costs in quality and gains in time.

Three parts, each against cache_interval 1 (DeepCache off), branch 0:
- `quality`: the built-in default model, intervals 2, 3 and 5: prompt adherence (the adherence
  study's prompts, scored by benchmarks/scene_analyzer.py) and brightness (the brightness
  study's dark, bright, solid black and solid white prompts: mean and bins), N seeds each, so
  the zero-SNR brightness range is checked under the cache.
- `psnr`: a preset UNet (SD1.5's config, random weights): PSNR of the final latents of each
  interval against interval 1 (peak: the reference's range; presets have no VAE), and each
  interval's loop time, measured round robin in one run.
- `mix`: the step scheduler's choice. When rows at a full step and rows at a shallow step share
  a tick, they either split into a full call and a shallow call, or all run the full UNet.
  Times both on the preset at R rows, half of each.

    lumen bench deepcache --part quality psnr mix --out benchmarks/results
"""
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lumen.engine.builtin import torch_threads
from lumen.engine.validation import check_int

from . import adherence, brightness

PARTS = ("quality", "psnr", "mix")
INTERVALS = (1, 2, 3, 5)
BRIGHTNESS_PROMPTS = ("dark", "bright", "solid black", "solid white")


def quality(n: int, steps: int, guidance: float, intervals=INTERVALS) -> dict:
    """{interval: {"adherence": overall fractions, "brightness": {group: mean and bins}}}."""
    setup = next(s for s in brightness.SETUPS if s.key == "default-rescale")
    eng = brightness.build_setup(setup)
    judged = adherence.validation()["judged"]
    out = {}
    for interval in intervals:
        start = time.perf_counter()

        def images(prompt):
            return eng.run(prompt=prompt, num_images_per_prompt=n, num_inference_steps=steps,
                           guidance_scale=guidance, guidance_rescale=setup.guidance_rescale,
                           generator=[torch.Generator().manual_seed(i) for i in range(n)],
                           cache_interval=interval, output_type="pt").images
        by_prompt = {p: adherence.score_images(images(p), adherence.prompt_scene(p), judged)
                     for p in adherence.PROMPTS}
        bright = {}
        for group in BRIGHTNESS_PROMPTS:
            values = images(brightness.PROMPTS[group]).mean(dim=(1, 2, 3))
            bright[group] = {"mean": float(values.mean()), **brightness.bin_fractions(values)}
        out[interval] = {"adherence": adherence.overall(by_prompt), "brightness": bright,
                         "seconds": round(time.perf_counter() - start, 1)}
        print(f"interval {interval}: all correct {out[interval]['adherence']['all correct']:.3f}, "
              f"{out[interval]['seconds']} s", flush=True)
    return out


def preset_setup(model: str, size: int, steps: int, rows: int = 1):
    from .ablation import Settings, load

    return load(Settings(model=model, height=size, width=size, steps=steps, batch=rows))


def psnr(model: str, size: int, steps: int, iters: int, intervals=INTERVALS) -> dict:
    """{interval: {"psnr_db", "loop_ms", "speedup"}} on the preset, timed round robin."""
    from .ablation import engine_loop, timed_call

    setup = preset_setup(model, size, steps)
    from lumen.engine.runtime import TorchRunner

    runner = TorchRunner(setup.components.unet)
    loops = {i: engine_loop(setup, runner, "torch", setup.device.type == "cuda", "auto",
                            None if i == 1 else (i, 0)) for i in intervals}
    outputs = {i: timed_call(loop, setup.device)[2].float() for i, loop in loops.items()}  # warm-up
    times = {i: [] for i in intervals}
    for _ in range(iters):
        for i, loop in loops.items():
            times[i].append(timed_call(loop, setup.device)[0])
    ref = outputs[intervals[0]]
    peak = float(ref.max() - ref.min())
    out = {}
    for i in intervals:
        mse = float(((outputs[i] - ref) ** 2).mean())
        loop_ms = statistics.median(times[i]) * 1e3
        out[i] = {"psnr_db": math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse),
                  "loop_ms": loop_ms}
    for i in intervals:
        out[i]["speedup"] = out[intervals[0]]["loop_ms"] / out[i]["loop_ms"]
        print(f"interval {i}: PSNR {out[i]['psnr_db']:.1f} dB, {out[i]['loop_ms']:.0f} ms, "
              f"{out[i]['speedup']:.2f}x", flush=True)
    return out


def mix(model: str, size: int, rows: int, iters: int) -> dict:
    """Time of one tick with rows/2 at a full step and rows/2 at a shallow one: split into two
    calls (what engine.slots does) against the full UNet for all rows."""
    from lumen.engine import deepcache
    from lumen.engine.runtime import TorchRunner

    from .ablation import synchronize

    setup = preset_setup(model, size, 2, rows)
    r = setup.request
    x = torch.cat([r["x_T"]] * (2 if r["cfg"] else 1)).to(setup.dtype)
    t = r["dp"].timesteps[0].expand(x.shape[0])
    emb, added, half = r["emb"], r["added"], x.shape[0] // 2
    runner, switch = TorchRunner(setup.components.unet).cached()

    def call(mode, lo, hi):
        switch.set(mode)
        return runner(x[lo:hi], t[lo:hi], emb[lo:hi], **{k: v[lo:hi] for k, v in added.items()})

    @torch.inference_mode()
    def split():
        switch.kept.clear()
        call("full", 0, half)
        kept = dict(switch.kept)
        switch.kept.clear()
        switch.set("shallow")
        switch.kept.update(deepcache.rows_of(switch.reused(), [(kept, p) for p in range(half)]))
        call("shallow", half, x.shape[0])
        switch.set(None)

    @torch.inference_mode()
    def all_full():
        call(None, 0, x.shape[0])

    times = {"split": [], "all_full": []}
    for fn in (split, all_full):  # warm-up
        fn()
    for _ in range(iters):
        for name, fn in (("split", split), ("all_full", all_full)):
            synchronize(setup.device)
            start = time.perf_counter()
            fn()
            synchronize(setup.device)
            times[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out["ratio"] = out["all_full"] / out["split"]
    print(f"{x.shape[0]} UNet rows, half shallow: split {out['split']:.1f} ms, all full "
          f"{out['all_full']:.1f} ms ({out['ratio']:.2f}x)", flush=True)
    return out


def markdown(data: dict) -> str:
    lines = []
    if "quality" in data:
        q = data["quality"]
        lines += [f"Default model, {data['n']} seeds per prompt, {data['steps']} steps, guidance "
                  f"{data['guidance']}, rescale 0.7, branch 0.", "",
                  "| interval | adherence all correct | background | colour | shape | one shape | "
                  + " | ".join(f"{g} mean (dark/bright)" for g in BRIGHTNESS_PROMPTS) + " | wall s |",
                  "|---" * (7 + len(BRIGHTNESS_PROMPTS)) + "|"]
        for i, r in q.items():
            a = r["adherence"]
            cells = [f"{a[k]:.3f}" for k in ("all correct", "background", "color", "kind", "one shape")]
            b = [f"{r['brightness'][g]['mean']:.3f} ({r['brightness'][g]['dark']:.2f}/"
                 f"{r['brightness'][g]['bright']:.2f})" for g in BRIGHTNESS_PROMPTS]
            lines.append(f"| {i} | " + " | ".join(cells + b) + f" | {r['seconds']} |")
        lines.append("")
    if "psnr" in data:
        p = data["psnr"]
        lines += [f"{data['model']} (random weights, real config), {data['size']}x{data['size']}, "
                  f"{data['psnr_steps']} steps, CFG, {data['device']}, median of {data['iters']}.",
                  "", "| interval | latent PSNR vs interval 1 (dB) | loop ms | speed-up |",
                  "|---|---|---|---|"]
        lines += [f"| {i} | {r['psnr_db']:.1f} | {r['loop_ms']:.0f} | {r['speedup']:.2f}x |"
                  for i, r in p.items()]
        lines.append("")
    if "mix" in data:
        m = data["mix"]
        lines += [f"Mixed tick, {data['model']} {data['size']}x{data['size']}, {data['mix_rows']} "
                  f"images with CFG, half at a full step, half shallow (branch 0): split into two "
                  f"calls {m['split']:.1f} ms, full UNet for all {m['all_full']:.1f} ms "
                  f"({m['ratio']:.2f}x).", ""]
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--n", type=int, default=16, help="quality: seeds per prompt")
    parser.add_argument("--steps", type=int, default=25, help="quality: steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--model", default="sd15", help="psnr, mix: the preset")
    parser.add_argument("--size", type=int, default=256, help="psnr, mix: pixels per side")
    parser.add_argument("--psnr-steps", type=int, default=10)
    parser.add_argument("--mix-rows", type=int, default=4, help="mix: images (half shallow)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results", help="folder for deepcache.md, .json")


@torch_threads(2)
def run(args) -> int:
    for name in ("n", "steps", "psnr_steps", "iters", "size"):
        check_int(name, getattr(args, name), 1)
    check_int("mix_rows", args.mix_rows, 2)
    check_int("psnr_steps", args.psnr_steps, max(INTERVALS))  # every interval fits the run
    check_int("steps", args.steps, max(INTERVALS))
    start = time.perf_counter()
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"cpu ({torch.get_num_threads()} threads)")
    data = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "model": args.model,
            "size": args.size, "psnr_steps": args.psnr_steps, "mix_rows": args.mix_rows,
            "iters": args.iters, "device": device}
    if "quality" in args.part:
        data["quality"] = quality(args.n, args.steps, args.guidance)
    if "psnr" in args.part:
        data["psnr"] = psnr(args.model, args.size, args.psnr_steps, args.iters)
    if "mix" in args.part:
        data["mix"] = mix(args.model, args.size, args.mix_rows, args.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "deepcache-" + "-".join(args.part)
    (out / f"{name}.md").write_text(markdown(data))
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(markdown(data))
    print(f"wrote {out}/{name}.md, .json in {time.perf_counter() - start:.0f} s")
    return 0
