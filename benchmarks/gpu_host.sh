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
# --no-build-isolation: an isolated build would fetch setuptools; the stages run from this
# folder anyway, so a failed install is reported and the check still runs.
python3 -m pip install -q -e . --no-deps --no-build-isolation || echo "pip install -e . failed"
python3 -m pip show importlib_metadata filelock huggingface-hub numpy regex requests \
  safetensors Pillow 2>/dev/null | grep -E "^(Name|Version):" | paste - - | tee "$out/packages.txt"
PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out "$out" --budget-s "${BUDGET_S:-480}" \
  "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
