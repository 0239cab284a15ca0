"""The GPU check's model stages: `lumen bench` rows, a graph-replay soak, the VAE decode.

Same contract as gpu_stages.py: `stage(sizes, out) -> {"headline", "figures", "checks"}`, or
{"skip": reason}. diffusers is imported inside the stages, so a host without it gets an
"error: diffusers not installed" record for these stages and runs the others.
"""
from dataclasses import asdict
from pathlib import Path

import torch

from .ablation import APPROXIMATE
from .gpu_stages import check

MEMORY_BOUND_MIB = 1.0  # allowed growth of torch.cuda.memory_allocated over the soak


# ---------------------------------------------------------------------------------------------
# sd15, sdxl: the bench rows


def sd15(sizes, out: Path) -> dict:
    return bench(sizes.sd15, sizes)


def sdxl(sizes, out: Path) -> dict:
    return bench(sizes.sdxl, sizes) if sizes.sdxl is not None else dict(skip=sizes.sdxl_skip)


def bench(settings, sizes) -> dict:
    """Every row the device supports plus the floors (benchmarks.ablation), with checks."""
    from .ablation import describe, load, run_rows
    from .report import table

    setup = load(settings)
    facts = describe(setup, settings)
    print(f"{facts['model']}: {facts['parameters']:,} parameters, {facts['height']}x"
          f"{facts['width']}, {facts['dtype']}, {facts['steps']} steps, {facts['device']}",
          flush=True)
    rows = run_rows(setup, settings, say=lambda line: print(line, flush=True))
    print(table(rows), flush=True)
    measured = [r for r in rows if not r.skipped]
    loops = [r for r in measured if not r.row.startswith("floor:")]
    best = max(loops, key=lambda r: r.it_per_s)
    headline = (f"{best.row} {best.it_per_s:.1f} it/s ({best.overhead:.2f}x floor), eager "
                f"{next(r.it_per_s for r in loops if r.row == 'eager'):.1f} it/s; "
                f"{len(measured)} rows, {len(rows) - len(measured)} skipped")
    return dict(headline=headline, checks=bench_checks(rows, sizes, setup.device),
                figures=dict(run=facts, rows=[asdict(r) for r in rows]))


def bench_checks(rows, sizes, device: torch.device) -> list[dict]:
    measured = {r.row: r for r in rows if not r.skipped}
    slow = [name for name, r in measured.items() if not r.it_per_s or r.it_per_s <= 0]
    checks = [check("every row measured", not slow and "eager" in measured,
                    ", ".join(slow) or f"{', '.join(measured)}: it/s > 0")]
    lumen = {n: r.max_diff for n, r in measured.items() if n != "diffusers"
             and not n.startswith("floor:") and n not in APPROXIMATE}
    off = {n: d for n, d in lumen.items() if d is None or d > sizes.bench_tol}
    checks.append(check("Lumen rows match the eager row", not off, f"max_diff {off} > "
                        f"{sizes.bench_tol:g}" if off else f"max_diff <= {sizes.bench_tol:g}: "
                        f"{', '.join(f'{n} {d:.1e}' for n, d in lumen.items())}"))
    if "diffusers" in measured:
        d = measured["diffusers"].max_diff
        tol = sizes.diffusers_tol
        checks.append(check("diffusers row matches the eager row", tol is None or d <= tol,
                            f"max_diff {d:.1e}" + (" (recorded, not checked: fp16 latents, "
                                                   "t - T // S timesteps)" if tol is None
                                                   else f", bound {tol:g}")))
    if device.type == "cuda":
        missing = [n for n in ("fused", "graph") if n not in measured]
        checks.append(check("fused and graph rows ran", not missing,
                            ", ".join(missing) or "both measured"))
    return checks


# ---------------------------------------------------------------------------------------------
# soak: many graph-replayed requests on one engine


def soak(sizes, out: Path) -> dict:
    """sizes.soak_runs requests of varying seed, embeddings and resolution on one engine."""
    from lumen import engine

    from .presets import PRESETS

    device, dtype = torch.device(sizes.device), getattr(torch, sizes.soak_dtype)
    unet = PRESETS["small"].build(device, dtype)
    eng = engine.build(unet, device=device, dtype=dtype, cuda_graph="auto")
    warmup = len(sizes.soak_sizes)  # one capture per resolution, then only replays
    keys, allocated, nonfinite = set(), [], 0
    for i in range(sizes.soak_runs):
        r = eng.prepare(**soak_request(i, sizes, unet.config.cross_attention_dim))
        keys.add(eng.graph_key(r["emb"], r["x_T"], r["dp"], r["cfg"]))
        x0 = eng.run(**soak_request(i, sizes, unet.config.cross_attention_dim),
                     output_type="latent").images
        nonfinite += int(not torch.isfinite(x0).all())
        del x0
        if i >= warmup and device.type == "cuda":
            torch.cuda.synchronize(device)
            allocated.append(torch.cuda.memory_allocated(device) / 2**20)
    figures = dict(runs=sizes.soak_runs, warmup_runs=warmup, keys=len(keys),
                   cuda_graph=eng.cuda_graph, captures=eng.graphs.captures,
                   replays=eng.graphs.replays, evictions=eng.graphs.evictions,
                   nonfinite_runs=nonfinite)
    checks = [check("no NaN or inf", nonfinite == 0, f"{nonfinite} of {sizes.soak_runs} runs"),
              soak_captures(eng, len(keys), device)]
    checks += memory_checks(allocated, figures) if device.type == "cuda" else []
    headline = (f"{sizes.soak_runs} runs, {len(keys)} keys, {eng.graphs.captures} captures, "
                + (f"memory growth {figures['growth_mib']:.2f} MiB" if allocated else
                   f"graphs off on {device.type} (memory not tracked)"))
    return dict(headline=headline, figures=figures, checks=checks)


def soak_request(i: int, sizes, dim: int) -> dict:
    """Request i: its own seed, random embeddings (77 tokens), guidance in [2, 9], a size."""
    g = torch.Generator().manual_seed(i)
    height, width = sizes.soak_sizes[i % len(sizes.soak_sizes)]
    return dict(prompt_embeds=torch.randn(1, 77, dim, generator=g),
                negative_prompt_embeds=torch.randn(1, 77, dim, generator=g),
                num_inference_steps=sizes.soak_steps, guidance_scale=2.0 + i % 8,
                guidance_rescale=0.7, generator=torch.Generator().manual_seed(1000 + i),
                height=height, width=width)


def soak_captures(eng, keys: int, device: torch.device) -> dict:
    if not eng.cuda_graph:
        return check("no captures with graphs off", eng.graphs.captures == 0,
                     f"cuda_graph off on {device.type}; {eng.graphs.captures} captures")
    ok = eng.graphs.captures == keys and eng.graphs.evictions == 0
    return check("one capture per key", ok, f"{eng.graphs.captures} captures, {keys} distinct "
                 f"GraphKeys, {eng.graphs.evictions} evictions")


def memory_checks(allocated: list[float], figures: dict) -> list[dict]:
    """torch.cuda.memory_allocated after warm-up: first, last, max; growth within the bound."""
    growth = max(allocated) - allocated[0]
    figures.update(first_mib=allocated[0], last_mib=allocated[-1], max_mib=max(allocated),
                   growth_mib=growth, bound_mib=MEMORY_BOUND_MIB)
    return [check("allocated memory stays flat", growth <= MEMORY_BOUND_MIB,
                  f"first {allocated[0]:.2f}, last {allocated[-1]:.2f}, max {max(allocated):.2f} "
                  f"MiB; growth {growth:.3f} MiB, bound {MEMORY_BOUND_MIB:g} MiB")]


# ---------------------------------------------------------------------------------------------
# vae: decode precision, and force_upcast through the engine's decode


def vae(sizes, out: Path) -> dict:
    """fp16 and fp32 decodes of one latent agree; a force_upcast VAE decodes in fp32."""
    from diffusers import AutoencoderKL

    device = torch.device(sizes.device)
    torch.manual_seed(0)
    reference = AutoencoderKL(**dict(sizes.vae, force_upcast=False)).to(device).eval()
    x0 = torch.randn(sizes.vae_latent, generator=torch.Generator().manual_seed(0))
    x0 = x0.to(device) * reference.config.scaling_factor  # a latent as the sampler returns it
    image32 = decoded(reference, x0)
    half = AutoencoderKL(**dict(sizes.vae, force_upcast=False)).to(device, torch.float16).eval()
    half.load_state_dict(reference.state_dict())
    diff = float((decoded(half, x0) - image32).abs().max())
    upcast = force_upcast_decode(sizes, reference, x0, image32)
    figures = dict(latent=list(sizes.vae_latent), image=list(image32.shape),
                   fp16_vs_fp32_max_abs=diff, tolerance=sizes.vae_tol, **upcast.pop("figures"))
    checks = [check("fp16 decode matches fp32", diff < sizes.vae_tol,
                    f"max |image fp16 - image fp32| = {diff:.1e}, bound {sizes.vae_tol:g} "
                    "(images in [0, 1])"), upcast["check"]]
    headline = (f"fp16 vs fp32 {diff:.1e} (< {sizes.vae_tol:g}); force_upcast decode in "
                f"{figures['force_upcast_decoder_dtype']}")
    return dict(headline=headline, figures=figures, checks=checks)


def decoded(vae, x0: torch.Tensor, run_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The engine's decode of x0 (engine.output.decode): an image [N, 3, H, W] in [0, 1].

    With run_dtype, the VAE is first loaded as the engine loads it for a run in that dtype
    (Components.to), which may keep it in another dtype.
    """
    from lumen.engine.models import Components
    from lumen.engine.output import decode

    components = Components(unet=None, vae=vae)  # decode reads only the VAE
    if run_dtype is not None:
        components.to(x0.device, run_dtype)
    return decode(x0, components, "pt").float()


def force_upcast_decode(sizes, reference, x0, image32) -> dict:
    """The dtype the decoder of a force_upcast=True VAE runs in, in an fp16 engine run."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**dict(sizes.vae, force_upcast=True)).eval()
    vae.load_state_dict(reference.state_dict())
    seen = []
    vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    diff = float((decoded(vae, x0, torch.float16) - image32).abs().max())
    ran = str(seen[-1]).removeprefix("torch.") if seen else "unknown (decoder not called)"
    ok = ran == "float32"
    detail = (f"loaded for an fp16 run (Components.to) and decoded by engine.output.decode, "
              f"the decoder ran in {ran}; max |image - fp32 image| = {diff:.1e}")
    if not ok:
        detail += ("; expected float32: the VAE's config says force_upcast=True, which "
                   "diffusers' pipelines honour by decoding in fp32")
    return dict(check=check("force_upcast VAE decodes in fp32", ok, detail),
                figures=dict(force_upcast_decoder_dtype=ran, force_upcast_vs_fp32_max_abs=diff))
