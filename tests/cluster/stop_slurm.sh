#!/bin/bash
# Stop the daemons that start_slurm.sh started under a base directory, by PID (no pkill: other
# clusters or a system munged on the machine are left alone). munged is stopped only if
# start_slurm.sh started it (it then left $BASE/state/munged.pid).
# Usage: tests/cluster/stop_slurm.sh [SLURM_BASE]   (default: $SLURM_BASE)
BASE=${1:-${SLURM_BASE:?usage: stop_slurm.sh SLURM_BASE}}
rc=0
pids=() files=()
# Signal all first, then wait: each daemon takes ~2 s to save state and exit, so in parallel.
for f in "$BASE/state/slurmd.pid" "$BASE/state/slurmctld.pid" "$BASE/state/munged.pid"; do
  [ -s "$f" ] || continue
  P=$(cat "$f")
  if kill "$P" 2>/dev/null; then pids+=("$P"); files+=("$f"); else rm -f "$f"; fi
done
for i in "${!pids[@]}"; do
  P=${pids[$i]} f=${files[$i]}
  for _ in $(seq 100); do kill -0 "$P" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$P" 2>/dev/null; then
    kill -9 "$P" 2>/dev/null; echo "stop_slurm.sh: $P ($f) did not stop in 10 s; killed" >&2; rc=1
  else
    echo "stopped $P ($f)"
  fi
  rm -f "$f"
done
exit $rc
