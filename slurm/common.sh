# shellcheck shell=bash
# Sourced by slurm/pretrain*.sbatch: the signal, wait and requeue protocol, in one place.
#
# The trainer treats SIGUSR1/SIGUSR2/SIGTERM as "stop soon": all ranks save one checkpoint together
# at the next optimizer-step boundary and exit with REQUEUE_EXIT_CODE (75). The batch script gets the
# time-limit warning (#SBATCH --signal=B:USR1@...), passes it to the step, and requeues the job when
# -- and only when -- the step exits 75. Exit 0 ends the job; any other code is a real failure and
# ends it too, so a crash never loops through the queue. A node that fails is SLURM's business: it
# ends the job as NODE_FAIL once the node stops answering (SlurmdTimeout) and, with --requeue,
# requeues it onto healthy nodes (at most MaxBatchRequeue times); the next run resumes from the
# newest committed checkpoint. The messages below say which of these happens.

REQUEUE_EXIT_CODE=75

say() { echo "[${RDS_SCRIPT:-roberta-ds}] $*"; }

# run_training CMD...: run CMD (an `srun ...` line) in the background, pass USR1/USR2 that reach
# this shell on to it, wait for it, then act on its exit code (see the top of this file). Requeues
# at most MAX_REQUEUES times (SLURM_RESTART_COUNT counts them). Never returns.
run_training() {
  local srun_pid="" rc=0 term=0 restarts=${SLURM_RESTART_COUNT:-0}
  # bash runs a trap only between commands; `wait` returns as soon as a trapped signal arrives, so
  # the step gets the signal at once (srun passes it to every process of the step).
  # shellcheck disable=SC2317  # invoked by the traps below
  _forward() {
    say "got SIG$1; passing it to the step (the ranks save at the next step boundary, then exit 75)"
    if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
  }
  trap '_forward USR1' USR1
  trap '_forward USR2' USR2
  # SIGTERM: SLURM is ending the job (scancel, the time limit, a failed node) and SIGKILLs it after
  # KillWait. The step gets the signal from SLURM too; this shell stops waiting for it (srun may wait
  # for a lost node longer than KillWait), says what happens and never requeues. From then on TERM is
  # ignored, also by the sinfo/scontrol it runs for that: SLURM signals every process of the job.
  trap 'term=1; trap "" TERM' TERM
  "$@" &
  srun_pid=$!
  while kill -0 "$srun_pid" 2>/dev/null && [ "$term" = 0 ]; do
    wait "$srun_pid" || true
  done
  local ended="exit code"
  if kill -0 "$srun_pid" 2>/dev/null; then
    rc=143 ended="SIGTERM while the step ran; exit code"
  else
    wait "$srun_pid" || rc=$?   # bash keeps a finished child's status: this is the step's exit code
    # A wait that a SIGTERM interrupted just as srun ended can leave bash without its status (-1).
    if (( rc < 0 )); then rc=143 ended="SIGTERM as the step ended; exit code"; fi
  fi
  trap - USR1 USR2

  if [ "$rc" = 0 ]; then
    say "training finished (exit 0)"
    exit 0
  fi
  if [ "$term" = 0 ] && [ "$rc" != "$REQUEUE_EXIT_CODE" ]; then
    await_lost_node "$rc"
  fi
  local lost
  lost=$(lost_nodes) || lost=""
  if [ -n "$lost" ]; then
    if scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q "Requeue=1"; then
      say "training failed (${ended} ${rc}): node(s) ${lost} of this job failed. SLURM ends this run" \
          "as NODE_FAIL and requeues the job onto healthy nodes (--requeue); the next run resumes from the" \
          "newest committed checkpoint"
    else
      say "training failed (${ended} ${rc}): node(s) ${lost} of this job failed. SLURM ends the job" \
          "as NODE_FAIL and does not requeue it (--no-requeue): resubmit this script; it resumes from the" \
          "newest committed checkpoint"
    fi
    exit "$rc"
  fi
  if [ "$term" = 1 ]; then
    say "got SIGTERM: SLURM is ending the job (scancel or the time limit; ${ended} ${rc}); not requeued" \
        "(resubmit this script to resume from the newest committed checkpoint)"
    exit "$rc"
  fi
  if [ "$rc" != "$REQUEUE_EXIT_CODE" ]; then
    say "training failed with exit code ${rc}; not requeued (the error is above)"
    exit "$rc"
  fi
  if (( restarts >= ${MAX_REQUEUES:-50} )); then
    say "checkpoint saved, but not requeued: already requeued ${restarts} times (MAX_REQUEUES=${MAX_REQUEUES:-50})"
    exit "$REQUEUE_EXIT_CODE"
  fi
  say "checkpoint saved after a signal; requeueing job ${SLURM_JOB_ID} (restart $(( restarts + 1 )))"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    say "scontrol requeue failed; resubmit this script: it resumes from the checkpoint"
    exit "$REQUEUE_EXIT_CODE"
  fi
  exit 0
}

# lost_nodes: this job's nodes that SLURM has declared down or failed, e.g. "rdsnode2 (down*)".
lost_nodes() {
  sinfo -h -N -n "${SLURM_JOB_NODELIST:-}" -o '%N %T' 2>/dev/null | sort -u \
    | awk '$2 ~ /^(down|fail)/ { printf "%s%s (%s)", sep, $1, $2; sep = ", " }'
}

# all_nodes_answer: a trivial step runs on every node of the job within 30 s (one probe per node, all
# at once); false when a node's slurmd is dead or cut off.
all_nodes_answer() {
  local n p ok=0 pids=()
  for n in $(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null); do
    timeout 30 srun --overlap --nodes=1 --ntasks=1 --nodelist="$n" true >/dev/null 2>&1 &
    pids+=("$!")
  done
  for p in "${pids[@]}"; do wait "$p" || ok=1; done
  return "$ok"
}

# await_lost_node RC: after a failed step, find out whether a node was lost before saying what
# happens. srun can end before SLURM notices that a node died or was cut off (the node's connections
# drop); SLURM declares a silent node DOWN only after SlurmdTimeout and then ends the job as NODE_FAIL.
# So when some node does not run a trivial step, wait (up to SlurmdTimeout + 60 s) until SLURM
# declares one lost, or until SIGTERM (the NODE_FAIL itself).
await_lost_node() {
  local limit t0=$SECONDS
  if [ -n "$(lost_nodes)" ] || all_nodes_answer; then return 0; fi
  limit=$(scontrol show config 2>/dev/null | awk '$1 == "SlurmdTimeout" { print $3 }')
  limit=$(( ${limit:-300} + 60 ))
  say "step exit code $1, and a node of this job (${SLURM_JOB_NODELIST:-}) did not run a trivial step:" \
      "waiting up to ${limit} s for SLURM to declare a node down (SlurmdTimeout) or not"
  while [ "$term" = 0 ] && (( SECONDS - t0 < limit )); do
    if [ -n "$(lost_nodes)" ]; then return 0; fi
    sleep 1
  done
}

# venv_env: the venv's bin first on PATH (its `ninja` for DeepSpeed's JIT ops) and one extension
# cache per venv (two venvs sharing a cache rebuild the ops on every run). No-op when VENV="".
venv_env() {
  if [ -n "${VENV:-}" ]; then
    export PATH="$VENV/bin:$PATH"
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}
  fi
}
