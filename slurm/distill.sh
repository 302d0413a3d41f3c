#!/usr/bin/env bash
#SBATCH --job-name=distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# Distillation: SFT of a smaller dense student on the stage-3 rejection-sampling data.
#   sbatch slurm/distill.sh model=STUDENT stage.data_from=STAGE3_RS_RUN_DIR [Hydra overrides]
# Resources go on the sbatch command line; one task per GPU, e.g. on 4 nodes of 8 GPUs:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/distill.sh model=qwen2_5_7b parallel=tp2 ...
# Logs: slurm/logs/<job name>-<job id>.out (submit from the repo root). run_dir: runs/slurm/<stage>-<job id>
# unless run_dir= is given. Preemption and requeue: slurm/common.sh.
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
r1_require_slurm
r1_launch distill "$@"
