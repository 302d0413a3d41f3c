# Sourced by every slurm/*.sh: the checks, the srun launch, and preemption.
#
# One task per GPU: `srun` starts NTASKS copies of `python -m rlhf.train`; parallel/env.py takes rank,
# world size and the master address from Slurm's variables. Hydra overrides pass through unchanged.
# Preemption: the scripts ask for USR1 ahead of the time limit (`--signal=B:USR1@180`); the batch shell
# forwards it (and TERM) to srun, which forwards it to the tasks; they finish the step, checkpoint and
# exit 75; then this script requeues the job (`scontrol requeue`) and the new run resumes from `latest`.
# Settings: R1_ROOT (the repo; default: where sbatch ran), R1_PYTHON (default: R1_ROOT/.venv/bin/python).

R1_ROOT=${R1_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
R1_PYTHON=${R1_PYTHON:-$R1_ROOT/.venv/bin/python}
REQUEUE_EXIT=75  # rlhf/preempt.py

r1_die() { echo "$(basename "$0"): $*" >&2; exit 2; }

r1_require_slurm() {
  [ -n "${SLURM_JOB_ID:-}" ] || r1_die "this script runs under Slurm: submit it with 'sbatch $0 [Hydra overrides]'." \
    "Without Slurm run the stage directly: python -m rlhf.train stage=STAGE run_dir=PATH [overrides]"
  [ -f "$R1_ROOT/rlhf/train.py" ] || r1_die "R1_ROOT=$R1_ROOT is not the r1stack repo: submit from the repo root or export R1_ROOT=/path/to/r1stack"
  [ -x "$R1_PYTHON" ] || r1_die "no Python at R1_PYTHON=$R1_PYTHON: run 'make setup' in $R1_ROOT or export R1_PYTHON"
  cd "$R1_ROOT" || exit 2
  export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export PYTHONPATH="$R1_ROOT${PYTHONPATH:+:$PYTHONPATH}" R1_NO_PROGRESS=1
}

# r1_default_run_dir STAGE ARGS...: the run_dir override to add, unless the user gave one. The job id
# survives a requeue, so a requeued job finds its own checkpoints.
r1_default_run_dir() {
  local stage=$1; shift
  for a in "$@"; do [[ $a == run_dir=* ]] && return; done
  echo "run_dir=runs/slurm/$stage-$SLURM_JOB_ID"
}

# r1_launch STAGE [overrides]: one srun step of `rlhf.train stage=STAGE`. Returns its exit status;
# A run preempted with its checkpoint written (exit 75, R1_PREEMPTED_FILE) requeues the job instead.
r1_launch() {
  local stage=$1; shift
  local args=("stage=$stage" "$@") dir
  dir=$(r1_default_run_dir "$stage" "$@")
  [ -n "$dir" ] && args+=("$dir")
  "$R1_PYTHON" -m tools.check_launch "${SLURM_NTASKS:-1}" "${args[@]}" || exit 2
  echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): srun -n ${SLURM_NTASKS:-1} rlhf.train ${args[*]}"
  export R1_PREEMPTED_FILE="$R1_ROOT/slurm/logs/.preempted-$SLURM_JOB_ID"
  rm -f "$R1_PREEMPTED_FILE"
  srun --kill-on-bad-exit=1 "$R1_PYTHON" -m rlhf.train "${args[@]}" &
  local pid=$! rc
  # A trap runs only while the shell waits, so wait in the background; wait again after each signal.
  trap "echo \"\$(date -Is) preemption signal: forwarding USR1 to the tasks\"; kill -USR1 $pid 2>/dev/null" USR1 TERM
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"; rc=$?
  trap - USR1 TERM
  if [ -f "$R1_PREEMPTED_FILE" ]; then  # srun's own status may be a killed task's: see rlhf/preempt.py
    rm -f "$R1_PREEMPTED_FILE"
    echo "$(date -Is) preempted with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # Slurm ends this script as the job goes back to the queue
    exit "$REQUEUE_EXIT"
  fi
  return "$rc"
}
