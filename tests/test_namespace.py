"""One import namespace: everything installs under `lumen`, beside Hugging Face's `kernels`.

The repository keeps engine/, kernels/, export/, serve/ and benchmarks/ as top-level folders;
setup.py's package_dir installs them as lumen.engine, lumen.kernels, ... Checked here: no file
imports a bare package name (statically); the command-line parsers form no import circle and
never import the front door; the wheel holds `lumen` alone, with every module and data file;
both the wheel and the editable install import and run; a checkout's root on sys.path does not
hide Hugging Face's `kernels`; and that `kernels` and lumen.kernels work in one process.
"""
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from repo_layout import PACKAGES, REPO  # installed as lumen.<folder>

# Repository files under the packages that are not installed: the benchmarks' write-ups and
# recorded results, and the GPU host's script, which runs from a checkout.
NOT_INSTALLED = ("benchmarks/README.md", "benchmarks/RESULTS.md", "benchmarks/results/",
                 "benchmarks/gpu_host.sh")


def python_files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (REPO / top).rglob("*.py")
                  if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    """The installed name of a project file: engine/runtime.py -> lumen.engine.runtime."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts if parts[0] == "lumen" else ["lumen", *parts])


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a project file."""
    package = module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    return imports_in(path.read_text(encoding="utf-8"), package)


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in source, function-level ones included;
    relative imports resolved against package (the installed name of the source's package)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from lumen import engine` imports the subpackage, `from lumen import build` a name
            found += [(node.lineno, f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES
                       else base) for alias in node.names]
    return found


# an import statement inside a string: code that a test or benchmark runs in `python -c`
STRING_IMPORT = re.compile(r"(?:^|[;\n])\s*(?:from\s+([\w.]+)\s+import\b|import\s+([\w.]+))")


def string_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import statement written inside a string literal (f-strings too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [(node.lineno, a or b) for a, b in STRING_IMPORT.findall(node.value)]
    return found


def bare(names: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [(line, name) for line, name in names if name.split(".")[0] in PACKAGES]


MODULES = {module_name(p): p for p in python_files("lumen", *PACKAGES)}


def test_no_file_imports_a_bare_package_name():
    hits = []
    for path in python_files("lumen", *PACKAGES, "tests"):
        found = imports(path)
        if path != Path(__file__):  # this file's strings are probes and Hugging Face's kernels
            found += string_imports(path.read_text(encoding="utf-8"))
        hits += [f"{path.relative_to(REPO)}:{line}: {name}" for line, name in bare(found)]
    assert not hits, "import these as lumen.<name> (or relatively):\n" + "\n".join(hits)


def test_the_import_check_sees_every_form_and_resolves_relative_imports():
    source = ("import kernels\nfrom engine.runtime import Engine\n"
              "def f():\n    import serve.app\n    from benchmarks import cli\n"
              "from lumen.engine import build\nfrom lumen import export\n"
              "from .app import create_app\nfrom ..engine import lora\nfrom . import batcher\n"
              "import lumen\nfrom lumen import Engine\n")
    found = imports_in(source, "lumen.serve")
    assert [name for _, name in bare(found)] == ["kernels", "engine.runtime", "serve.app",
                                                 "benchmarks"]
    assert [name for _, name in found if (_, name) not in bare(found)] == [
        "lumen.engine", "lumen.export", "lumen.serve.app", "lumen.engine.lora",
        "lumen.serve.batcher", "lumen", "lumen"]
    code = ('run(["-c", "import json; from kernels.aot import compile_set"])\n'
            'code = f"import engine; engine.build({model!r})"\n'
            '"""Prose: a bare `import engine` would load a second copy."""\n'
            'ok = "from lumen.kernels import aot; import torch"\n')
    assert sorted(name for _, name in bare(string_imports(code))) == ["engine", "kernels.aot"]


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports (at any depth in the file)."""
    return {name: {target for _, target in imports(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def test_command_line_parsers_form_no_import_circle_and_never_import_the_front_door():
    graph = import_graph()
    front_door = {"lumen", "lumen.cli"}
    for name, targets in graph.items():
        if name.startswith(tuple(f"lumen.{p}" for p in PACKAGES)):
            assert not targets & front_door, f"{name} imports {targets & front_door}"
    parsers = ["lumen.engine.cli", "lumen.export.cli", "lumen.serve.cli", "lumen.serve.ray_app",
               "lumen.benchmarks.cli"]
    for start in parsers:  # through any module: a parser that reaches itself is in a circle
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself back (through some of {sorted(seen)})"
            if module not in seen:
                seen.add(module)
                todo += graph[module]
    assert graph["lumen.cli"] >= {"lumen.engine.cli", "lumen.export.cli", "lumen.serve.cli",
                                  "lumen.benchmarks.cli"}


# ---------------------------------------------------------------------------------------------
# The wheel, built offline, and both installs


def tracked_files(*tops: str) -> list[str]:
    done = subprocess.run(["git", "ls-files", *tops], cwd=REPO, capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # from a copy of the tracked files: an in-tree build would leave build/ behind, and
    # build/lib's stale files would go into the next wheel
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    # offline: no index, the environment's setuptools builds it
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                           "--no-build-isolation", "--wheel-dir", str(out), str(source)],
                          cwd=out, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("lumen_diffusion-*.whl")
    return path


def test_the_wheels_only_top_level_package_is_lumen(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"lumen"} and len(dist_info) == 1
    (info,) = dist_info
    assert zipfile.ZipFile(wheel).read(f"{info}/top_level.txt").decode().split() == ["lumen"]
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "lumen = lumen.cli:main" in entry_points


def test_the_wheel_holds_every_module_weight_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f if f.startswith("lumen/") else f"lumen/{f}"
                for f in tracked_files(*PACKAGES, "lumen") if not f.startswith(NOT_INSTALLED)}
    assert expected - names == set(), "missing from the wheel"
    weights = [n for n in expected if "/builtin/weights/" in n]
    assert len([n for n in weights if n.endswith(".safetensors")]) == 6
    assert {"lumen/serve/serve_config.yaml", "lumen/engine/builtin/weights/default/unet/"
            "diffusion_pytorch_model.safetensors", "lumen/engine/builtin/weights/default/"
            "controlnet/diffusion_pytorch_model.safetensors"} <= names
    stray = {n for n in names if n.startswith("lumen/") and n not in expected}
    assert stray == set(), "files in the wheel that the repository does not track"


RUN_DEFAULT = """
import json, sys, torch
import lumen
from lumen import engine
eng = lumen.build("default")
assert engine.build is lumen.build and lumen.Engine is engine.Engine
x = eng.run(prompt="a white circle on a solid black background", num_inference_steps=3,
            generator=torch.Generator().manual_seed(5), output_type="pt").images
print(json.dumps({"lumen": lumen.__file__, "engine": lumen.engine.__file__,
                  "kernels": getattr(sys.modules.get("kernels"), "__file__", None),
                  "mean": float(x.double().mean()), "sum": float(x.double().abs().sum())}))
"""


def run_python(code: str, cwd: Path, **env) -> dict:
    """code in a fresh interpreter; the dicts it printed as JSON lines, merged."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return {k: v for line in lines for k, v in json.loads(line).items()}


@pytest.fixture(scope="module")
def editable_run(tmp_path_factory) -> dict:
    """The default model run by the editable install, from outside the checkout."""
    return run_python(RUN_DEFAULT, tmp_path_factory.mktemp("elsewhere"))


def test_the_installed_wheel_imports_and_runs_the_default_model(wheel, tmp_path, editable_run):
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == \
        ["bin", "lumen"]
    # PYTHONPATH comes before site-packages, where the editable install's finder is
    ran = run_python(RUN_DEFAULT, tmp_path, PYTHONPATH=str(site))
    assert Path(ran["lumen"]) == site / "lumen" / "__init__.py"
    assert Path(ran["engine"]) == site / "lumen" / "engine" / "__init__.py"
    assert Path(editable_run["engine"]) == REPO / "engine" / "__init__.py"
    assert (ran["mean"], ran["sum"]) == (editable_run["mean"], editable_run["sum"])
    assert 0 < ran["mean"] < 1


# ---------------------------------------------------------------------------------------------
# Hugging Face's `kernels` (transformers >= 5.25 requires it) beside lumen.kernels


def hub_kernels_version() -> str | None:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None


needs_hub_kernels = pytest.mark.skipif(
    hub_kernels_version() is None,
    reason="Hugging Face's kernels is not installed (transformers >= 5.25 requires it)")

BOTH_KERNELS = """
import json, sys, torch
import kernels  # Hugging Face's
import lumen.kernels
from lumen.engine.samplers import plan_ddim, step_schedule
from lumen import SamplerConfig
assert callable(kernels.get_kernel), kernels.__file__
g = torch.Generator().manual_seed(0)
plan = plan_ddim(*step_schedule(SamplerConfig(), 7), 0.5).to("cpu")
shape = (2, 3, 9, 7)  # irregular, to exercise the masks
args = dict(m=torch.randn((4,) + shape[1:], generator=g), x=torch.randn(shape, generator=g),
            noise_i=torch.randn(shape, generator=g), a_t=plan.a[2], s_t=plan.s[2],
            coef_i=plan.coef[2], guidance_scale=torch.tensor(7.5),
            guidance_rescale=torch.tensor(0.7), prediction_type="v_prediction", cfg=True)
assert lumen.kernels.use_triton(args["x"])
fused = lumen.kernels.guided_step(**args)
reference = lumen.kernels.guided_step_reference(**args)
print(json.dumps({"hub": kernels.__file__, "lumen_kernels": lumen.kernels.__file__,
                  "step_error": float((fused - reference).abs().max()),
                  "step_norm": float(reference.abs().max())}))
""" + RUN_DEFAULT


@needs_hub_kernels
def test_hub_kernels_and_lumen_kernels_run_in_one_process(tmp_path, editable_run):
    import transformers

    ran = run_python(BOTH_KERNELS, tmp_path, TRITON_INTERPRET="1", LUMEN_KERNELS="triton")
    assert Path(ran["hub"]).parent.name == "kernels" and "site-packages" in ran["hub"]
    assert Path(ran["lumen_kernels"]) == REPO / "kernels" / "__init__.py"
    assert ran["step_error"] < 1e-5 and ran["step_norm"] > 0.1
    assert ran["kernels"] == ran["hub"]  # what transformers imported is Hugging Face's
    # the same image as the reference path's (here the Triton kernels ran, interpreted)
    assert (ran["mean"], ran["sum"]) == pytest.approx((editable_run["mean"], editable_run["sum"]),
                                                      rel=1e-5)
    print(f"transformers {transformers.__version__}, kernels {hub_kernels_version()}")


@needs_hub_kernels
def test_a_checkout_root_on_sys_path_does_not_hide_hub_kernels():
    # `python -c` in the repository root puts the root first on sys.path, where kernels/ is
    code = ("import sys, json; import lumen; import transformers.modeling_utils; "
            "print(json.dumps({'kernels': sys.modules['kernels'].__file__, 'path': sys.path}))")
    ran = run_python(code, REPO)
    assert "site-packages" in ran["kernels"] and Path(ran["kernels"]).parent.name == "kernels"
    assert str(REPO) not in ran["path"] and "" not in ran["path"]


def test_python_m_lumen_runs_from_the_checkout_root():
    done = subprocess.run([sys.executable, "-m", "lumen", "generate", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage: lumen generate")


def test_an_uninstalled_checkout_says_to_install():
    # -S: no site-packages, so no editable install; the checkout's root alone on sys.path
    done = subprocess.run([sys.executable, "-S", "-c", "import lumen"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: lumen.kernels not found: Lumen's packages install through setup.py's "
        "package_dir; run `pip install -e .` (or install the wheel)")
