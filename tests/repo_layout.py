"""The repository's layout, for the tests that read it: the root, and the package folders that
setup.py's package_dir installs as lumen.<folder>."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "export", "serve", "benchmarks")
