"""Keeps a checkout's root off sys.path: its folders are lumen.*, never top-level packages."""
import importlib.util
import sys
from pathlib import Path


def package_root() -> Path:
    """The folder holding lumen.kernels' folder: the checkout's root in an editable install."""
    spec = importlib.util.find_spec(f"{__package__}.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{__package__}.kernels not found: Lumen's packages install through "
                          "setup.py's package_dir; run `pip install -e .` (or install the wheel)")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def leave_checkout_root() -> None:
    """Drops a checkout's root from sys.path, where `python -m` or `python -c` run there put it.

    In a checkout, engine/, kernels/, export/, serve/ and benchmarks/ sit beside lumen/ and
    install as lumen.engine, lumen.kernels, ... (setup.py's package_dir). On sys.path, the root
    would make kernels/ hide Hugging Face's `kernels`, which transformers imports, and would let
    a bare `import engine` load a second copy of a module. In a wheel, lumen.kernels lies inside
    lumen/, and nothing changes.
    """
    root = package_root()
    if root != Path(__file__).resolve().parents[1]:
        return  # an installed wheel: site-packages/lumen/kernels
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
