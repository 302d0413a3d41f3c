#!/usr/bin/env bash
# A real one-node Slurm cluster for the tests: Debian's slurmctld, slurmd, slurm-client and munge.
#
#   tools/slurm_local.sh start DIR   # install the packages if missing (root), write DIR/slurm.conf, start the daemons
#   tools/slurm_local.sh stop DIR    # stop the daemons this script started, by the PIDs in DIR, nothing else
#
# Clients need SLURM_CONF=DIR/slurm.conf (without it they try a DNS SRV lookup and fail). cred_expire=10
# keeps a requeue from waiting 120 s; no systemd or cgroups are needed (proctrack/linuxproc, task/none).
set -euo pipefail

cmd=${1:?usage: tools/slurm_local.sh start|stop DIR}
dir=${2:?usage: tools/slurm_local.sh start|stop DIR}
DAEMONS=(slurmd slurmctld munged)  # stopped in this order

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null && return
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_local: slurmctld/slurmd/munge are not installed and installing needs root:" \
         "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
}

stop() {
  for d in "${DAEMONS[@]}"; do
    local pidfile="$dir/$d.pid"
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    # A stopped daemon can linger as <defunct>: wait on its state, not on the PID existing.
    for _ in $(seq 50); do
      state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
      [ -z "$state" ] || [[ $state == Z* ]] && break
      sleep 0.1
    done
    state=$(ps -o stat= -p "$pid" 2>/dev/null || true)
    [ -z "$state" ] || [[ $state == Z* ]] || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

start() {
  install
  mkdir -p "$dir"/{state,spool,log,munge}
  chmod 700 "$dir/munge"
  local host mem
  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  cat > "$dir/slurm.conf" <<EOF
ClusterName=r1stack-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
ReturnToService=2
KillWait=10
SlurmctldPort=$((6817 + 20 * ($$ % 50)))
SlurmdPort=$((6818 + 20 * ($$ % 50)))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  [ -f "$dir/munge/munge.key" ] || mungekey --create --keyfile="$dir/munge/munge.key" >/dev/null
  chmod 400 "$dir/munge/munge.key"
  munged --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
         --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" --force
  slurmctld -f "$dir/slurm.conf"
  slurmd -f "$dir/slurm.conf"
  export SLURM_CONF="$dir/slurm.conf"
  for _ in $(seq 100); do
    sinfo -h -o %t 2>/dev/null | grep -qx idle && return 0
    sleep 0.1
  done
  echo "slurm_local: the node did not come up idle; logs in $dir/log" >&2
  stop
  exit 1
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: tools/slurm_local.sh start|stop DIR" >&2; exit 2 ;;
esac
