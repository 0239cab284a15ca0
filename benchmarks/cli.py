"""`lumen bench ...`: the benchmark subcommands."""


def add_parsers(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark or study")
    which = bench.add_subparsers(dest="bench", required=True)
    from . import brightness

    p = which.add_parser("brightness", help="brightness study of the built-in models (Lin et al.)")
    brightness.add_arguments(p)
    p.set_defaults(func=brightness.run)
