"""The `lumen` command (also `python -m lumen`): generate, build, serve, bench.

Each package owns its subcommands' parsers; this module only gathers them, and none of them
imports it back.
"""
import argparse
import sys

from lumen.benchmarks.cli import add_parsers as add_bench_parsers
from lumen.engine.cli import add_generate_parser
from lumen.engine.errors import LumenError
from lumen.export.cli import add_build_parser
from lumen.serve.cli import add_serve_parser


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lumen",
        description="Generate images, build backend artifacts, serve, run benchmarks.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parser, add_build_parser, add_serve_parser, add_bench_parsers):
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except LumenError as err:
        print(f"lumen: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
