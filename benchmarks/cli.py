"""`lumen bench ...`: the loop ablations (no subcommand), the brightness study, serving load."""


def add_parsers(subparsers) -> None:
    from . import brightness, report, serve_load

    bench = subparsers.add_parser(
        "bench", help="cumulative ablations of the sampling loop, or a study",
        description="Cumulative ablations of one request's sampling loop (see "
                    "benchmarks/ablation.py), `lumen bench brightness` or `lumen bench serve`.")
    report.add_arguments(bench)
    bench.set_defaults(func=report.run)
    which = bench.add_subparsers(dest="bench", required=False)
    p = which.add_parser("brightness", help="brightness study of the built-in models (Lin et al.)")
    brightness.add_arguments(p)
    p.set_defaults(func=brightness.run)
    p = which.add_parser("serve", help="lumen serve under 1, 4, 16 clients, batching on vs off")
    serve_load.add_arguments(p)
    p.set_defaults(func=serve_load.run)
