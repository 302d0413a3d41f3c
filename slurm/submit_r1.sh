#!/usr/bin/env bash
# Submits the whole DeepSeek-R1 recipe as Slurm jobs, each starting only when the one it needs succeeded
# (--dependency=afterok): r1_zero → stage 1 → stage 2 → stage 3 → two reward models → stage 4, distill after stage 3, eval last.
#
#   slurm/submit_r1.sh BASE_RUN_DIR [Hydra overrides for every stage]
#   R1_RUN=runs/r1 R1_SBATCH="--nodes=4 --ntasks-per-node=8 --gpus-per-node=8" slurm/submit_r1.sh runs/base
#   slurm/submit_r1.sh --dry-run runs/base     # print the sbatch commands, submit nothing
#
# Run it from the repo root on a login node. Each stage's run_dir is R1_RUN/<stage> (default runs/r1-<date>).
set -euo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
base=${1:?usage: slurm/submit_r1.sh [--dry-run] BASE_RUN_DIR [Hydra overrides]}
shift
[ -f slurm/common.sh ] || { echo "submit_r1.sh: run it from the r1stack repo root" >&2; exit 2; }
[ "$dry" = 1 ] || [ -d "$base" ] || { echo "submit_r1.sh: BASE_RUN_DIR $base does not exist" >&2; exit 2; }
run=${R1_RUN:-runs/r1-$(date +%Y%m%d-%H%M%S)}
read -r -a opts <<< "${R1_SBATCH:-}"
# submit NAME AFTER SCRIPT ARGS...: prints the job id (<NAME> in a dry run).
submit() {
  local name=$1 after=$2 script=$3; shift 3
  local dep=()
  [ -n "$after" ] && dep=("--dependency=afterok:$after")
  if [ "$dry" = 1 ]; then
    echo "sbatch --parsable ${opts[*]} ${dep[*]} slurm/$script $*" >&2
    echo "<$name>"
  else
    sbatch --parsable "${opts[@]}" "${dep[@]}" "slurm/$script" "$@" | cut -d';' -f1
  fi
}

zero=$(submit r1_zero "" r1_zero.sh stage.init_from="$base" run_dir="$run/r1_zero" "$@")
s1=$(submit stage1 "$zero" r1_stage1.sh stage.init_from="$base" stage.data_from="$run/r1_zero" run_dir="$run/stage1" "$@")
s2=$(submit stage2 "$s1" r1_stage2.sh stage.init_from="$run/stage1" run_dir="$run/stage2" "$@")
s3=$(R1_RUN_DIR="$run/stage3" submit stage3 "$s2" r1_stage3.sh stage.init_from="$run/stage2" "$@")
# Stage 4's reward models, from the stage-3 model: preference pairs from R1_HELPFUL_PAIRS / R1_HARMLESS_PAIRS
# ({prompt, chosen, rejected} JSONL), else the tiny greeting task's generated ones.
pairs() { if [ -n "$2" ]; then echo "stage.data_from=$2"; else echo "data=preference_$1"; fi; }
rmh=$(submit rm_helpful "$s3" reward_model.sh stage.init_from="$run/stage3/sft" "$(pairs helpful "${R1_HELPFUL_PAIRS:-}")" \
  stage.view=summary run_dir="$run/rm_helpful" "$@")
rmx=$(submit rm_harmless "$s3" reward_model.sh stage.init_from="$run/stage3/sft" "$(pairs harmless "${R1_HARMLESS_PAIRS:-}")" \
  run_dir="$run/rm_harmless" "$@")
s4=$(submit stage4 "$s3:$rmh:$rmx" r1_stage4.sh stage.init_from="$run/stage3/sft" run_dir="$run/stage4" \
  reward.models.helpful.path="$run/rm_helpful" reward.models.harmless.path="$run/rm_harmless" "$@")
st=$(submit distill "$s3" distill.sh stage.data_from="$run/stage3/rejection_sampling" run_dir="$run/distill" "$@")
ev=$(submit eval "$s4:$st" eval.sh model="$run/stage4" run_dir="$run/eval" "$@")
echo "submitted to $run: r1_zero $zero, stage1 $s1, stage2 $s2, stage3 $s3, rm_helpful $rmh, rm_harmless $rmx, stage4 $s4, distill $st, eval $ev"
