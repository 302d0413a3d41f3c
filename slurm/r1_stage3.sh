#!/usr/bin/env bash
#SBATCH --job-name=r1_stage3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# R1 stage 3: rejection sampling from the stage-2 model (verified, clean samples + non-reasoning data), then SFT of the base on it.
#   sbatch slurm/r1_stage3.sh stage.init_from=STAGE2_RUN_DIR [Hydra overrides]  # R1_RUN_DIR=... sets the two run dirs' parent
# Resources go on the sbatch command line; one task per GPU, e.g. on 4 nodes of 8 GPUs:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/r1_stage3.sh model=qwen2_5_7b parallel=tp2 ...
# Logs: slurm/logs/<job name>-<job id>.out (submit from the repo root). run_dir: runs/slurm/<stage>-<job id>
# unless run_dir= is given. Preemption and requeue: slurm/common.sh.
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
r1_require_slurm
run=${R1_RUN_DIR:-runs/slurm/r1_stage3-$SLURM_JOB_ID}
r1_launch rejection_sampling run_dir="$run/rejection_sampling" "$@" || exit
r1_launch sft run_dir="$run/sft" stage.data_from="$run/rejection_sampling" "$@"
