#!/bin/bash
# Stop the cluster that start_slurm.sh started under a base directory; safe to run twice, and after
# a start or a test that failed half-way.
#
# Daemons are stopped by PID (no pkill: other clusters or a system munged on the machine are left
# alone); munged only if start_slurm.sh started it (it then left $BASE/state/munged.pid). A
# multi-node cluster (SLURM_NODES >= 2: $BASE/cluster.env exists) also loses its jobs, whatever is
# left in its nodes (job steps, ranks), the client commands still talking to it (an srun whose node
# is gone waits forever), and its network namespaces, links and bridge (tests/cluster/node.sh down).
# Usage: tests/cluster/stop_slurm.sh [SLURM_BASE]   (default: $SLURM_BASE)
BASE=${1:-${SLURM_BASE:?usage: stop_slurm.sh SLURM_BASE}}
HERE=$(cd "$(dirname "$0")" && pwd)
MULTI=0
[ -f "$BASE/cluster.env" ] && MULTI=1
export SLURM_CONF="$BASE/slurm.conf"
rc=0

# Jobs first (multi-node), while slurmctld can still tell the nodes to end their steps.
ctld_pid=$(cat "$BASE/state/slurmctld.pid" 2>/dev/null)
if [ "$MULTI" = 1 ] && [ -n "$ctld_pid" ] && kill -0 "$ctld_pid" 2>/dev/null; then
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086  # one id per word
    timeout 10 scancel $jobs 2>/dev/null && sleep 1
  fi
fi

pids=() files=()
# Signal all first, then wait: each daemon takes ~2 s to save state and exit, so in parallel.
for f in "$BASE"/state/slurmd*.pid "$BASE/state/slurmctld.pid" "$BASE/state/munged.pid"; do
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

if [ "$MULTI" = 1 ]; then
  # Client commands of THIS cluster left in the root namespace (their environment names its
  # slurm.conf): srun/sbatch/... and processes of an allocation (SLURM_JOB_ID). Never this script
  # or its ancestors (a test that runs it has SLURM_CONF set too).
  skip=" $$ " a=$PPID
  while [ "${a:-0}" -gt 1 ]; do skip+="$a "; a=$(awk '{print $4}' "/proc/$a/stat" 2>/dev/null); done
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    case "$skip" in *" $p "*) continue ;; esac
    env=$( { tr '\0' '\n' < "$d/environ"; } 2>/dev/null ) || continue
    grep -qxF "SLURM_CONF=$SLURM_CONF" <<< "$env" || continue
    case $(cat "$d/comm" 2>/dev/null) in
      srun|salloc|sbatch|sattach|scontrol|squeue|sinfo|scancel|mpirun|orterun|prterun) ;;
      *) grep -q '^SLURM_JOB_ID=' <<< "$env" || continue ;;
    esac
    echo "stop_slurm.sh: killing leftover $p ($( { tr '\0' ' ' < "$d/cmdline"; } 2>/dev/null | cut -c1-120))"
    kill -9 "$p" 2>/dev/null
  done
  "$HERE/node.sh" down "$BASE" || rc=1
fi
exit $rc
