# shellcheck shell=bash disable=SC2034  # sourced; OPD_RUN_CMD and OPD_RL_ARGS are the callers' results
# Shared by slurm/one_node.sbatch and slurm/multi_node.sbatch (sourced, not run).
#
# Environment read (all optional):
#   OPD_ROOT   the project checkout (default: the directory sbatch was called from, SLURM_SUBMIT_DIR)
#   OPD_RUN    how to run the project's commands, split on spaces
#              (default: "uv run --project gpu", the README's GPU command; a CPU-only
#              cluster sets OPD_RUN="uv run")

opd_die() { echo "error: $*" >&2; exit 2; }

# cd to the checkout; set the array OPD_RUN_CMD.
opd_setup() {
  local root=${OPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $root/pyproject.toml && -d $root/orchestrator ]] \
    || opd_die "$root is not the opd checkout; submit from the checkout's root or set OPD_ROOT"
  cd "$root" || opd_die "cannot cd to $root"
  read -r -a OPD_RUN_CMD <<<"${OPD_RUN:-uv run --project gpu}"
  [[ ${#OPD_RUN_CMD[@]} -gt 0 ]] || opd_die "OPD_RUN is empty"
  # Ray: no token-auth warning; workers run the venv's interpreter instead of re-resolving with `uv run`.
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_DEDUP_LOGS=0
  export RAY_USAGE_STATS_ENABLED=0
}

# The arguments of `rl` in the array OPD_RL_ARGS: "experiments/x.toml --key value ..." gets its `@`;
# arguments that already start with `@` (several TOML files) pass through as they are.
opd_rl_args() {
  [[ $# -gt 0 ]] || opd_die "usage: sbatch $(basename "${OPD_SCRIPT:-$0}") EXPERIMENT.toml [--section.key VALUE ...]"
  if [[ $1 == "@" ]]; then
    OPD_RL_ARGS=("$@")
  else
    [[ -f $1 ]] || opd_die "$1: experiment TOML not found (relative paths start at $PWD)"
    OPD_RL_ARGS=("@" "$@")
  fi
}

# A shell-quoted copy of a command, for the log and --print-plan.
opd_quote() {
  local out="" a
  for a in "$@"; do out+="$(printf '%q' "$a") "; done
  echo "${out% }"
}

# The card's GPU ids count the GPUs rl sees. With Slurm's device cgroup (ConstrainDevices=yes) the job
# sees only its GPUs, numbered 0..n-1; without it CUDA_VISIBLE_DEVICES names the job's physical GPUs (say
# 4,5,6,7), and rl gives the actor of id i the i-th of them (shared/placement.py). Say which, in the log.
opd_check_gpus() {
  local cvd=${CUDA_VISIBLE_DEVICES:-} want="" i n
  [[ -n $cvd && $cvd =~ ^[0-9,]+$ ]] || return 0
  n=$(tr ',' '\n' <<<"$cvd" | wc -l)
  for ((i = 0; i < n; i++)); do want+="${want:+,}$i"; done
  if [[ $cvd != "$want" ]]; then
    echo "opd: Slurm gave this job GPUs $cvd (CUDA_VISIBLE_DEVICES); rl's GPU ids 0..$((n - 1)) are these, in order"
  fi
}

# Run rl (the command in "$@") so that it can stop cleanly: a USR1 or TERM sent to this batch shell only
# (`#SBATCH --signal=B:USR1@300` before the time limit, or `scancel --signal=USR1 --batch JOB`) is passed
# on to rl alone as SIGTERM, while its Ray actors are still alive; rl finishes the step in progress, writes
# a checkpoint and exits 143 (`--resume` continues). Returns rl's exit status.
opd_run_rl() {
  local pid status
  "$@" &
  pid=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "echo 'opd: stop requested: SIGTERM to rl (pid $pid)'; kill -TERM $pid 2>/dev/null || true" USR1 TERM
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" 2>/dev/null || true  # returns early (status > 128) when a trapped signal arrives
  done
  wait "$pid" && status=0 || status=$?  # the status bash kept for the finished child
  trap - USR1 TERM
  return "$status"
}
