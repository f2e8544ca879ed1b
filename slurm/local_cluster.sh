#!/usr/bin/env bash
# A private Slurm on this machine, for tests and for trying the sbatch scripts without a cluster.
#
#   slurm/local_cluster.sh start DIR [NODES]   write DIR/slurm.conf, start munged, slurmctld and NODES
#                                               slurmd daemons (default 1), wait until the nodes are idle
#   slurm/local_cluster.sh stop DIR            stop the daemons started in DIR (by their pid files)
#
# Then point Slurm's commands at it:  export SLURM_CONF=DIR/slurm.conf
#
# Needs root (slurmd starts jobs as the submitting user) and Debian's packages `slurm-wlm` and `munge`.
# Everything lives in DIR: the munge key and socket, state, spool, logs and pid files; the system's own
# /etc/slurm and /etc/munge are not touched. NODES > 1 defines that many Slurm nodes (opd1, opd2, ...),
# all on 127.0.0.1 with one slurmd each, so `sbatch --nodes=2` runs a real two-node allocation here.
# Ports: slurmctld on a free port, each slurmd on the next ones (chosen at start).
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: $0 start DIR [NODES] | stop DIR"
cmd=$1
dir=$2
nodes=${3:-1}

stop() {
  local pidfile pid jobs
  # Jobs first, while slurmd can still end their steps (a step left behind would outlive the cluster).
  if [[ -f $dir/slurm.conf && -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    jobs=$(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
      # shellcheck disable=SC2086  # one job id a word
      SLURM_CONF=$dir/slurm.conf scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do
        [[ -z $(SLURM_CONF=$dir/slurm.conf squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.5
      done
    fi
  fi
  for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case $cmd in
  stop) stop; exit 0 ;;
  start) ;;
  *) die "unknown command '$cmd' (start or stop)" ;;
esac

[[ $nodes =~ ^[1-9][0-9]?$ ]] || die "NODES must be a number from 1 to 99, got '$nodes'"
[[ $dir != *[[:space:]]* ]] || die "DIR must not contain whitespace (slurm.conf cannot quote paths): '$dir'"
[[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as the submitting user)"
for exe in slurmctld slurmd munged sinfo; do
  command -v "$exe" >/dev/null || [[ -x /usr/sbin/$exe ]] || die "$exe not found: apt-get install slurm-wlm munge"
done
export PATH="$PATH:/usr/sbin"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/state" "$dir/log"
stop  # daemons left over from an earlier start in the same DIR

# munge: a private key and socket (no system munged needed, none disturbed).
if [[ ! -s $dir/munge.key ]]; then
  (umask 077 && head -c 1024 /dev/urandom >"$dir/munge.key")
fi
chmod 400 "$dir/munge.key"
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
  --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed" || die "munged did not start (see $dir/log/munged.log)"

host=$(hostname -s)
cpus=$(nproc)
ctld_port=$(free_port)
{
  echo "# written by slurm/local_cluster.sh"
  echo "ClusterName=opd-local"
  echo "SlurmctldHost=$host(127.0.0.1)"
  echo "SlurmctldPort=$ctld_port"
  echo "SlurmUser=root"
  echo "AuthType=auth/munge"
  echo "CredType=cred/munge"
  echo "AuthInfo=socket=$dir/munge.socket"
  echo "ProctrackType=proctrack/linuxproc"
  echo "TaskPlugin=task/none"
  echo "SelectType=select/cons_tres"
  echo "SelectTypeParameters=CR_Core"
  echo "MpiDefault=none"
  echo "ReturnToService=2"
  echo "StateSaveLocation=$dir/state"
  echo "SlurmdSpoolDir=$dir/spool-%n"
  echo "SlurmctldPidFile=$dir/slurmctld.pid"
  echo "SlurmdPidFile=$dir/slurmd-%n.pid"
  echo "SlurmctldLogFile=$dir/log/slurmctld.log"
  echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
  echo "JobCompType=jobcomp/none"
  echo "JobAcctGatherType=jobacct_gather/none"
  echo "AccountingStorageType=accounting_storage/none"
  echo "SchedulerType=sched/backfill"
  echo "InactiveLimit=0"
  echo "KillWait=10"
  echo "MinJobAge=600"
  echo "SlurmdTimeout=60"
  names=()
  for i in $(seq "$nodes"); do
    if [[ $nodes -eq 1 ]]; then name=$host; else name=opd$i; fi
    names+=("$name")
    echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus RealMemory=1000 State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
} >"$dir/slurm.conf"

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $dir/log/slurmctld.log)"
for name in "${names[@]}"; do
  mkdir -p "$dir/spool-$name"
  if [[ $nodes -eq 1 ]]; then
    slurmd -f "$SLURM_CONF" || die "slurmd did not start (see $dir/log/slurmd-$name.log)"
  else
    slurmd -f "$SLURM_CONF" -N "$name" || die "slurmd -N $name did not start (see $dir/log/slurmd-$name.log)"
  fi
done

# Ready when every node is idle (slurmd registered with slurmctld).
for _ in $(seq 150); do
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  if [[ $idle -eq $nodes ]]; then
    echo "local Slurm up: $nodes node(s) (${names[*]}), SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
sinfo -N -l >&2 || true
die "nodes not idle after 30 s (logs in $dir/log)"
