"""A patched copy of the tensorrt-stubs package that mypy can read (used via MYPYPATH).

Defects of tensorrt-stubs 10.13.0.35.1 patched here, not in the code under check:
- `tensorrt/` ships no py.typed, so mypy refuses it from site-packages ([import-untyped]);
  stubs found through MYPYPATH need no marker.
- Plugin methods name a parameter `in` (a keyword): a syntax error that stops mypy.
- `add_scale_nd` has `channel_axis: int` after defaulted parameters: also a syntax error.
- `tensorrt/__init__.pyi` imports `tensorrt_libs`, which has no stub: an empty one is added.
- The module defines `bool: DataType`, shadowing the builtin, so every `-> bool` / `x: bool` in
  a signature is invalid and reads as Any; signatures are pointed at `builtins.bool`.
Errors left inside the stubs are silenced by tests/mypy_trt.ini (ignore_errors for them).
"""
import re
import sys
from importlib import util
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
_KEYWORD_PARAM = re.compile(r"(?<=[(,] )in(?=: )|(?<=\()in(?=: )")
_LATE_REQUIRED = "power: Weights = None, channel_axis: int)"
_BOOL_TYPE = re.compile(r"(?<=: )bool\b|(?<=-> )bool\b|(?<=\[)bool\b|(?<=, )bool(?=[\],])")


def stubs_root() -> Path | None:
    """site-packages holding tensorrt/__init__.pyi from tensorrt-stubs, or None."""
    if util.find_spec("tensorrt_stubs") is None:
        return None
    for entry in sys.path:
        if (Path(entry) / "tensorrt" / "__init__.pyi").is_file():
            return Path(entry)
    return None


def build_overlay(dest: Path) -> Path:
    """Copy the stub packages into dest with the defects above patched; returns dest."""
    root = stubs_root()
    if root is None:
        raise FileNotFoundError("tensorrt-stubs is not installed")
    for package in PACKAGES:
        for stub in (root / package).glob("*.pyi"):
            target = dest / package / stub.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(patch(stub.read_text()))
    (dest / "tensorrt_libs.pyi").write_text("")
    return dest


def patch(text: str) -> str:
    lines = []
    for line in text.splitlines():
        if line.lstrip().startswith("def "):
            line = _KEYWORD_PARAM.sub("in_", line)
            line = line.replace(_LATE_REQUIRED, "power: Weights = None, channel_axis: int = ...)")
            line = _BOOL_TYPE.sub("builtins.bool", line)
        lines.append(line)
    return "import builtins\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(build_overlay(Path(sys.argv[1])))
