#!/bin/bash
D=$(mktemp -d)/fresh; git clone -q /work/main $D; cd $D; git log --oneline -1
for spec in "0 default" "0 ACTIVE" "1 default" "2 default"; do
  set -- $spec
  echo "start seed $1 $2 $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  if [ "$2" = ACTIVE ]; then export OMP_WAIT_POLICY=ACTIVE; else unset OMP_WAIT_POLICY; fi
  if [ "$1" = 0 ] && [ "$2" = default ]; then
    UV_FIND_LINKS="$PIP_FIND_LINKS" uv run rl @ experiments/context_distill/rl.toml > log_$1_$2.txt 2>&1
    rc=$?; cp -r outputs/context_distill outputs/cd_s0_default
  else
    UV_FIND_LINKS="$PIP_FIND_LINKS" uv run rl @ experiments/context_distill/rl.toml --seed $1 --output_dir outputs/cd_s$1_$2 > log_$1_$2.txt 2>&1
    rc=$?
  fi
  echo "end seed $1 $2 rc $rc wall $(echo "$(date +%s.%N) - $start" | bc) $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  tail -2 log_$1_$2.txt
done
echo DIR $D
