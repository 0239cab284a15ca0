"""`python -m lumen.benchmarks`: the same as `lumen bench` (cumulative ablations of the loop)."""
import argparse
import sys

from .report import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m lumen.benchmarks", description="Cumulative ablations of the sampling loop.")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
