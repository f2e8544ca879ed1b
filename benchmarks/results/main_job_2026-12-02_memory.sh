#!/bin/bash
D=$(mktemp -d)/fresh; git clone -q /work/main $D; cd $D; git log --oneline -1
for s in 0 1 2; do
  echo "start seed $s $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  if [ "$s" = 0 ]; then
    UV_FIND_LINKS="$PIP_FIND_LINKS" uv run rl @ experiments/context_distill/rl.toml > log_$s.txt 2>&1
    rc=$?; cp -r outputs/context_distill outputs/cd_s0
  else
    UV_FIND_LINKS="$PIP_FIND_LINKS" uv run rl @ experiments/context_distill/rl.toml --seed $s --output_dir outputs/cd_s$s > log_$s.txt 2>&1
    rc=$?
  fi
  echo "end seed $s rc $rc wall $(echo "$(date +%s.%N) - $start" | bc) $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  tail -2 log_$s.txt
done
echo DIR $D
