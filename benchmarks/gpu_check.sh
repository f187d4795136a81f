#!/usr/bin/env bash
# The GPU check (issue 19): the one command to run on a GPU machine (H100 / H200), no network.
#
#   bash benchmarks/gpu_check.sh                      # GPU: install, then at most ~8 minutes
#   bash benchmarks/gpu_check.sh --dry-run            # CPU, tiny sizes, current env, no install
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --dry-run
#   bash benchmarks/gpu_check.sh --no-install [--only workloads,compile,cifar10_lt,usb]
#
# The machine has torch, timm, pluggy, click, rich and safetensors. Carry in the ignored folder
# .carry/ (next to this checkout's pyproject.toml):
#   .carry/wheels/*.whl            ltframe's other run-time deps: tomli-w (and torchvision if the
#                                  machine lacks it); setuptools>=77 if the machine's is older;
#                                  for the USB column: semilearn 0.3.2 and its run-time deps
#                                  (benchmarks/setup_usb.sh lists them)
#   .carry/cifar10-jpg.tar.gz      the CIFAR-10 JPEG export (../shared/data/README.md); extracted
#                                  once to .carry/cifar10/ for the CIFAR-10-LT ResNet-32 run
# Install step (skipped by --dry-run / --no-install): every wheel in .carry/wheels with
# `pip install --no-index --find-links .carry/wheels`, then `pip install --no-deps -e .`.
# Then `python benchmarks/gpu_check.py "$@"`: results to $OUT if set, else benchmarks/out/
# (gpu_check.json, rewritten after each section, and gpu_check.md, also printed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
install=1
args=()
for a in "$@"; do
  case "$a" in
    --dry-run) install=0; args+=("$a") ;;
    --no-install) install=0 ;;
    *) args+=("$a") ;;
  esac
done

if [ "$install" = 1 ]; then
  WHEELS=.carry/wheels
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "== installing carried wheels from $WHEELS"
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
  fi
  echo "== installing ltframe (--no-deps, editable) from $(pwd)"
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
    || "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps -e .
  # ltframe's run-time deps (pyproject.toml): report any still missing before the long run
  "$PY" - <<'EOF'
import importlib.util
missing = [m for m in ("torch", "torchvision", "timm", "pluggy", "click", "rich", "safetensors",
                       "tomli_w", "ltframe") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing modules: {', '.join(missing)} (carry their wheels in .carry/wheels)")
EOF
fi

exec "$PY" benchmarks/gpu_check.py ${args[@]+"${args[@]}"}
