"""UNet forward on torch vs onnxruntime (CPU), export time and cache-hit load time; one run.

    python -m lumen.benchmarks.bench_backends [--models small sd15] [--exporters] [--iters 3]

Random weights from configs (no downloads). One row per (model, backend): warm-up excluded from
the forward median and reported on its own; export = cold cache; reload = second load_runner on
the same cache (hash weights, verify sha256, create the session). --exporters also compares the
TorchScript and dynamo exporters on the small UNet: export seconds and max |ONNX - torch|.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .presets import PRESETS

MODELS = ("small", "sd15")  # presets.PRESETS: random weights, real configs


def make_inputs(name: str, batch: int, latent: int):
    """sample [B, 4, h, w], timestep [], encoder_hidden_states [B, 77, D]."""
    config = PRESETS[name].unet
    return (torch.randn(batch, config["in_channels"], latent, latent), torch.tensor(500.0),
            torch.randn(batch, 77, config["cross_attention_dim"]))


def time_forward(run, inputs, iters: int) -> tuple[float, float, torch.Tensor]:
    """(warm-up seconds, median seconds over iters, output)."""
    with torch.no_grad():
        start = time.perf_counter()
        out = run(*inputs)
        warmup = time.perf_counter() - start
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            run(*inputs)
            times.append(time.perf_counter() - start)
    return warmup, statistics.median(times), out


def bench_model(name: str, batch: int, latent: int, iters: int, cache_dir: Path) -> list[dict]:
    from lumen.export import load_runner

    start = time.perf_counter()
    unet = PRESETS[name].build()
    print(f"[{name}] built random UNet in {time.perf_counter() - start:.1f} s "
          f"({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M params)", flush=True)
    inputs = make_inputs(name, batch, latent)
    warm, median, ref = time_forward(lambda x, t, e: unet(x, t, encoder_hidden_states=e).sample,
                                     inputs, iters)
    rows = [dict(model=name, backend="torch", warmup_s=warm, forward_ms=median * 1e3)]
    start = time.perf_counter()
    runner = load_runner(unet, "onnxruntime", device="cpu", dtype=torch.float32,
                         cache_dir=cache_dir)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    runner = load_runner(unet, "onnxruntime", device="cpu", dtype=torch.float32,
                         cache_dir=cache_dir)
    reload_s = time.perf_counter() - start
    warm, median, out = time_forward(runner, inputs, iters)
    rows.append(dict(model=name, backend="onnxruntime", warmup_s=warm, forward_ms=median * 1e3,
                     export_s=export_s, reload_s=reload_s,
                     max_err=(out - ref).abs().max().item(),
                     mib=sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())
                     / 2**20))
    return rows


def bench_exporters(cache_root: Path) -> list[dict]:
    from lumen.export.onnx_export import export_onnx
    import onnxruntime as ort

    unet = PRESETS["small"].build()
    inputs = make_inputs("small", 2, 32)
    with torch.no_grad():
        ref = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    rows = []
    for exporter in ("torchscript", "dynamo"):
        path = cache_root / f"{exporter}.onnx"
        seconds = export_onnx(unet, path, dtype=torch.float32, exporter=exporter)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = dict(zip(("sample", "timestep", "encoder_hidden_states"),
                         (t.numpy() for t in inputs)))
        (out,) = session.run(None, feeds)
        rows.append(dict(exporter=exporter, export_s=seconds,
                         max_err=(torch.from_numpy(out) - ref).abs().max().item()))
        print(f"[exporter] {exporter}: {seconds:.1f} s, max err {rows[-1]['max_err']:.2e}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=2, help="CFG's batch (default 2)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (256 px / 8)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--exporters", action="store_true",
                        help="also compare TorchScript vs dynamo on the small UNet")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"latent {args.latent}x{args.latent}, median of {args.iters}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lumen-bench-") as tmp:
        if args.exporters:
            bench_exporters(Path(tmp))
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batch, args.latent, args.iters, Path(tmp) / name)
    print(f"\n{'model':6} {'backend':12} {'forward ms':>10} {'warm-up s':>9} {'export s':>8} "
          f"{'reload s':>8} {'max err':>8} {'MiB':>7}")
    for r in rows:
        extra = (f"{r['export_s']:8.1f} {r['reload_s']:8.2f} {r['max_err']:8.1e} {r['mib']:7.0f}"
                 if "export_s" in r else "")
        print(f"{r['model']:6} {r['backend']:12} {r['forward_ms']:10.1f} {r['warmup_s']:9.2f} "
              f"{extra}")


if __name__ == "__main__":
    main()
