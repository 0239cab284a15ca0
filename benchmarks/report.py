"""`lumen bench` arguments, and its outputs: a printed table, JSON and CSV."""
import csv
import json
from dataclasses import asdict
from pathlib import Path

from .ablation import ROWS, Row, Settings, describe, load, run_rows
from .presets import PRESETS

COLUMNS = (("row", "{}", 11), ("it_per_s", "{:.2f}", 9), ("ms_per_image", "{:.1f}", 12),
           ("overhead", "{:.3f}x", 9), ("peak_mib", "{:.0f}", 9), ("warmup_s", "{:.2f}", 8),
           ("capture_s", "{:.2f}", 9), ("compile_s", "{:.1f}", 9), ("max_diff", "{:.1e}", 8))


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="default",
                        help=f"built-in name, a local diffusers folder, or a preset "
                             f"({', '.join(PRESETS)}: random weights, real configs)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: native)")
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=7.5, help="1 runs without CFG")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--iters", type=int, default=5, help="timed requests per row (median)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None,
                        help="rows to run (default: all the device supports)")
    parser.add_argument("--compile-mode", default="default",
                        choices=("default", "max-autotune-no-cudagraphs"))
    parser.add_argument("--out", default=".", help="folder for the .json and .csv files")


def settings(args) -> Settings:
    return Settings(model=args.model, height=args.height, width=args.width, batch=args.batch,
                    steps=args.steps, guidance=args.guidance, dtype=args.dtype, device=args.device,
                    iters=args.iters, rows=tuple(args.rows) if args.rows else None,
                    compile_mode=args.compile_mode)


def run(args) -> int:
    from lumen.engine.validation import check_int, check_real

    for name in ("batch", "steps", "iters"):
        check_int(name, getattr(args, name), 1)
    check_real("guidance", args.guidance, 1.0, 100.0)
    s = settings(args)
    setup = load(s)
    facts = describe(setup, s)
    print(f"{facts['model']}: {facts['parameters']:,} UNet parameters; {facts['height']}x"
          f"{facts['width']} px, batch {s.batch}, {s.steps} steps, {facts['dtype']}, "
          f"CFG {'on' if facts['cfg'] else 'off'}; {facts['device']}, torch {facts['torch']}",
          flush=True)
    rows = run_rows(setup, s, say=lambda line: print(line, flush=True))
    print(table(rows))
    stem = Path(args.out) / (f"bench-{Path(s.model).name}-{facts['height']}x{facts['width']}"
                             f"-b{s.batch}-s{s.steps}-{facts['dtype']}")
    write(stem, facts, rows)
    print(f"wrote {stem}.json and {stem}.csv")
    return 0


def table(rows: list[Row]) -> str:
    """Fixed-width table: one line per row, skipped rows with their reason."""
    lines = ["  ".join(f"{name:>{width}}" for name, _, width in COLUMNS) + "  what"]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.row:>11}  skipped: {r.skipped}")
            continue
        cells = []
        for name, fmt, width in COLUMNS:
            value = getattr(r, name)
            cells.append(f"{'-' if value is None else fmt.format(value):>{width}}")
        lines.append("  ".join(cells) + f"  {r.what}")
    return "\n".join(lines)


def write(stem: Path, facts: dict, rows: list[Row]) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    data = [asdict(r) for r in rows]
    stem.with_suffix(".json").write_text(json.dumps({"run": facts, "rows": data}, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(facts) + list(data[0]))
        writer.writeheader()
        for row in data:
            writer.writerow({**facts, **row})
