#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (torch + CUDA, Python 3.12, no registry, no Transformer
# Engine or vLLM), about 3 minutes there.
#
#   bash tools/gpu_check.sh prepare    # here, with the registry: the wheels it needs into .whl/ (~3 MB)
#   bash tools/gpu_check.sh            # there, with .whl carried: results into $OUT (else runs/gpu_check)
#
# It runs the GPU-marked tests (those needing Transformer Engine, vLLM or DALI skip: not installed there)
# and the megatron bf16 training benchmark of a 1.5B dense model (Qwen2.5-1.5B's shape, local spec), whose
# MFU is measured against the same GPU's bf16 matmul peak: gpu_check.json, pytest.log, bench_mfu.json.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(megatron-core==0.19.2 hydra-core==1.3.8 omegaconf==2.3.0)
if [ "${1:-}" = prepare ]; then
  py=${PYTHON:-.venv/bin/python}
  rm -rf .whl && mkdir -p .whl
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || exit 1
  # hydra's parser runtime is published as a source archive only: a pure-Python wheel built here.
  "$py" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl || exit 1
  du -sh .whl && ls .whl
  exit 0
fi

out=${OUT:-runs/gpu_check}
mkdir -p "$out"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if ! python3 -c "import megatron.core, hydra" 2>/dev/null; then
  [ -d .whl ] || { echo "no .whl/: run 'bash tools/gpu_check.sh prepare' here and carry .whl"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 R1_NO_PROGRESS=1 WANDB_MODE=disabled

timeout 300 python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_shards.py 2>&1 \
  | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}

timeout 240 python3 -m tools.bench train_mfu --out "$out/bench_mfu.json" --steps 5 model=qwen2_5_1_5b \
  stage.train.seq_length=2048 stage.train.micro_batch_size=2 stage.train.global_batch_size=16 \
  stage.train.optim.lr=1e-5 2>&1 | grep -v -i "warn" | tail -20
bench_rc=${PIPESTATUS[0]}

python3 - "$out" "$tests_rc" "$bench_rc" "$start" <<'PY'
import json, pathlib, sys, time
out, tests_rc, bench_rc, start = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tail = (out / "pytest.log").read_text().strip().splitlines()[-1:] if (out / "pytest.log").exists() else []
bench = json.loads((out / "bench_mfu.json").read_text()) if (out / "bench_mfu.json").exists() else None
summary = {"gpu": (out / "gpu.txt").read_text().strip(), "tests_rc": tests_rc, "tests": tail, "bench_rc": bench_rc,
           "train_mfu": bench and bench["ratios"]["train_mfu"], "bench": bench and bench["figures"],
           "wall_s": round(time.time() - start)}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1))
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
