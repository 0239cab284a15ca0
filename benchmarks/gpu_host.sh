#!/usr/bin/env bash
# The GPU host's whole run (no network), from the repository root:
#   bash benchmarks/gpu_host.sh [gpu_check options, e.g. --stages env kernels]
# Installs the wheels carried in .whl/ (if any) into /tmp/site, this package without its
# dependencies, then runs the GPU check into $OUT/gpu (default ./gpu-check) with its log.
set -u
out="${OUT:-$PWD/gpu-check}/gpu"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# --no-build-isolation: an isolated build would fetch setuptools (the host has it). The
# install maps the repository's folders to lumen.engine, lumen.kernels, ... (setup.py's
# package_dir): without it nothing imports, so a failed install ends the run here.
if ! python3 -m pip install -q -e . --no-deps --no-build-isolation; then
  echo "gpu_host.sh: pip install -e . --no-deps failed; lumen cannot be imported" | tee "$out/gpu_check.log"
  exit 3
fi
python3 -m pip show importlib_metadata filelock huggingface-hub numpy regex requests \
  safetensors Pillow 2>/dev/null | grep -E "^(Name|Version):" | paste - - | tee "$out/packages.txt"
PYTHONUNBUFFERED=1 python3 -m lumen.benchmarks.gpu_check --out "$out" --budget-s "${BUDGET_S:-480}" \
  "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
