#!/usr/bin/env bash
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Held-out evaluation of a checkpoint: pass@1 over k samples (T 0.6, top-p 0.95), cons@k, lengths.
#   sbatch slurm/eval.sh model=RUN_DIR data=NAME [Hydra overrides]     (python -m tools.eval under srun)
# Resources go on the sbatch command line; one task per GPU, e.g. on 4 nodes of 8 GPUs:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/eval.sh model=qwen2_5_7b parallel=tp2 ...
# Logs: slurm/logs/<job name>-<job id>.out (submit from the repo root). run_dir: runs/slurm/<stage>-<job id>
# unless run_dir= is given. No preemption handling: a requeued evaluation starts over.
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
r1_require_slurm
dir=$(r1_default_run_dir eval "$@")
srun --kill-on-bad-exit=1 "$R1_PYTHON" -m tools.eval "$@" ${dir:+"$dir"}
