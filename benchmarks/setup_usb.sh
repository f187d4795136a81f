#!/usr/bin/env bash
# USB (PyPI `semilearn` 0.3.2), in one of two places:
#
#   bash benchmarks/setup_usb.sh
#       a separate venv .venv-usb/ (git-ignored, several GB) with its own torch, for
#       benchmarks/usb_speed.py.
#   bash benchmarks/setup_usb.sh --target .usb-site
#       a folder (git-ignored) beside the project's venv, for the peer tests
#       (tests/test_usb_peer.py). It holds semilearn and the modules `import semilearn` needs,
#       all installed --no-deps, so the project's venv and its torch stay as they are. Nothing
#       in it shadows a package of the venv. Then:
#       PYTHONPATH=.usb-site:$PYTHONPATH .venv/bin/python -m pytest -q tests/test_usb_peer.py
#
# semilearn 0.3.2 pins old versions of everything, so it is installed with --no-deps and its
# imports are added by hand. It imports its audio datasets (torchaudio) and its loggers (wandb,
# aim) when it is imported.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--target" ]]; then
    TARGET=${2:?usage: setup_usb.sh --target DIR}
    PY=${PYTHON:-.venv/bin/python}
    # Checked with torch 2.14.1, numpy 2.4, protobuf 7, Python 3.11 in the venv. torchaudio
    # stops at 2.11 on PyPI; semilearn only imports it. wandb stays below 0.28: later releases
    # need opentelemetry's exporters, and releases before 0.27 refuse protobuf 7 or numpy 2.
    "$PY" -m pip install --quiet --no-deps --upgrade --target "$TARGET" \
        semilearn==0.3.2 torchaudio==2.11.1 \
        scikit-image==0.26.0 scikit-learn==1.9.1 scipy==1.17.1 joblib==1.6.0 threadpoolctl==3.8.0 \
        lazy_loader==0.6 imageio==2.38.2 tifffile==2026.3.3 \
        transformers==5.25.0 tokenizers==0.23.3 regex==2026.12.2 \
        ruamel.yaml==0.19.1 ruamel.yaml.clib==0.2.15 progress==1.6.1 \
        wandb==0.27.2 platformdirs==4.14.9 pydantic==2.14.4 pydantic-core==2.50.5 \
        typing-inspection==0.4.5 annotated-types==0.8.0 requests==2.34.2 urllib3==2.8.0 \
        certifi==2026.10.19.post1 appdirs==1.4.4 \
        aim==3.29.1 aimrocks==0.5.2 websockets==17.4 psutil==7.2.2 cachetools==8.0.2 pytz==2026.6 \
        fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3 \
        sqlalchemy==2.1.9 restrictedpython==9.0 cloudpickle==3.1.3 narwhals==2.29.0
    PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore -c \
        "import semilearn, torch; print('semilearn importable from $TARGET with torch', torch.__version__)"
    exit 0
fi

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
