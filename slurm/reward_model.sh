#!/usr/bin/env bash
#SBATCH --job-name=reward_model
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
# A Bradley-Terry reward model (R1 stage 4 scores helpfulness and harmlessness with two of them).
#   sbatch slurm/reward_model.sh stage.init_from=SFT_RUN_DIR stage.data_from=PAIRS.jsonl [stage.view=summary] [Hydra overrides]
# Resources go on the sbatch command line; one task per GPU, e.g. on 4 nodes of 8 GPUs:
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/reward_model.sh model=qwen2_5_7b parallel=tp2 ...
# Logs: slurm/logs/<job name>-<job id>.out (submit from the repo root). run_dir: runs/slurm/<stage>-<job id>
# unless run_dir= is given. Preemption and requeue: slurm/common.sh.
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
r1_require_slurm
r1_launch reward_model "$@"
