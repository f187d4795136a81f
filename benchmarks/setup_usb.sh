#!/usr/bin/env bash
# A separate environment with USB (PyPI `semilearn`) for benchmarks/usb_speed.py.
# semilearn 0.3.2 pins old versions of everything; install it with --no-deps beside a torch
# that has a matching torchaudio (semilearn imports its audio datasets at import time), then
# the packages it imports at run time.
#   bash benchmarks/setup_usb.sh            # creates .venv-usb/ (git-ignored, several GB)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${USB_VENV:-.venv-usb}
TORCH=${USB_TORCH:-2.9.1}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH" "torchvision==0.24.*" "torchaudio==${TORCH%.*}.*"
"$VENV/bin/python" -m pip install --quiet --no-deps semilearn==0.3.2
# semilearn's run-time imports (its own pins are older than this Python allows)
"$VENV/bin/python" -m pip install --quiet numpy scipy scikit-learn scikit-image pyyaml tqdm \
    tensorboard pillow transformers sentencepiece timm progress ruamel.yaml ruamel.yaml.clib \
    matplotlib wandb aim
"$VENV/bin/python" -c "import semilearn, torch, torchaudio; print('semilearn', semilearn.__version__ if hasattr(semilearn, '__version__') else '0.3.2', 'torch', torch.__version__)"
