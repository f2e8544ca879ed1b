# Shared by slurm/one_node.sbatch and slurm/multi_node.sbatch (sourced, not run).
#
# Environment read (all optional):
#   OPD_ROOT   the project checkout (default: the directory sbatch was called from, SLURM_SUBMIT_DIR)
#   OPD_RUN    how to run the project's commands, split on spaces
#              (default: "uv run --no-group cpu --extra gpu", the README's GPU command; a CPU-only
#              cluster sets OPD_RUN="uv run")

opd_die() { echo "error: $*" >&2; exit 2; }

# cd to the checkout; set the array OPD_RUN_CMD.
opd_setup() {
  local root=${OPD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  [[ -f $root/pyproject.toml && -d $root/orchestrator ]] \
    || opd_die "$root is not the opd checkout; submit from the checkout's root or set OPD_ROOT"
  cd "$root" || opd_die "cannot cd to $root"
  read -r -a OPD_RUN_CMD <<<"${OPD_RUN:-uv run --no-group cpu --extra gpu}"
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
