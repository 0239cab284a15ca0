"""`lumen bench ...`: the loop ablations (no subcommand) and the brightness study."""


def add_parsers(subparsers) -> None:
    from . import brightness, report

    bench = subparsers.add_parser(
        "bench", help="cumulative ablations of the sampling loop, or a study",
        description="Cumulative ablations of one request's sampling loop (see "
                    "benchmarks/ablation.py), or `lumen bench brightness`.")
    report.add_arguments(bench)
    bench.set_defaults(func=report.run)
    which = bench.add_subparsers(dest="bench", required=False)
    p = which.add_parser("brightness", help="brightness study of the built-in models (Lin et al.)")
    brightness.add_arguments(p)
    p.set_defaults(func=brightness.run)
