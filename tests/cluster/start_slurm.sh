#!/bin/bash
# Start a throwaway SLURM cluster (slurmctld + slurmd [+ munged]) for roberta-ds's tests: one node
# (this machine, the default) or SLURM_NODES=N >= 2 nodes on this one machine, each a network + UTS +
# mount namespace with its own hostname (rdsnode1..N) and address (tests/cluster/node.sh says how).
#
# Needs root and Debian/Ubuntu (apt-get); no systemd, no cgroups (proctrack/linuxproc, task/none).
# Everything the cluster writes lives under $SLURM_BASE; nothing is written to /etc/slurm or
# /etc/hosts: clients find the cluster through SLURM_CONF=$SLURM_BASE/slurm.conf (source
# $SLURM_BASE/env.sh), and jobs inherit it because sbatch exports the submitting environment.
#
# Usage (as root):
#   SLURM_BASE=$(mktemp -d) tests/cluster/start_slurm.sh      # prints the env line to source
#   source "$SLURM_BASE/env.sh"; sbatch ...; tests/cluster/stop_slurm.sh "$SLURM_BASE"
#   SLURM_NODES=3 SLURM_BASE=$(mktemp -d) tests/cluster/start_slurm.sh     # 3 nodes rdsnode1..3
#
# Settings (environment):
#   SLURM_BASE        directory for config, state, spool and logs (default: a new mktemp -d)
#   SLURM_NODES       1 (default): this machine is the node; N >= 2: N namespace nodes (node.sh)
#   SLURM_NET         with N >= 2: the /28 the nodes use (default: a free 10.211.X.0/28; see node.sh)
#   SLURM_AUTH        none (default: no munge daemon needed) | munge (reuses a running munged)
#   SLURM_INSTALL     1 (default): apt-get install the missing packages; 0: fail naming them
#   SLURM_WITH_MPI    1 (default): also OpenMPI + PMIx, for `mpirun` and `srun --mpi=pmix`
#   SLURMCTLD_PORT, SLURMD_PORT   (default 6817, 6818; the Python harness picks free ones)
#   SLURM_NODE_CPUS   CPUs each node advertises (default: nproc, at least 2 so 2-task tests run)
#   SLURM_CRED_EXPIRE job credential lifetime in s (default 10; SLURM's is 120). It is also how long
#                     a job that requeued itself (killed by the requeue) must wait to start again.
#   SLURMD_TIMEOUT    with N >= 2: seconds without an answer before slurmctld marks a node DOWN and
#                     ends its jobs as NODE_FAIL (default 10; SLURM's is 300)
set -euo pipefail
BASE=${SLURM_BASE:-$(mktemp -d /tmp/roberta-ds-slurm.XXXXXX)}
AUTH=${SLURM_AUTH:-none}
INSTALL=${SLURM_INSTALL:-1}
WITH_MPI=${SLURM_WITH_MPI:-1}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
NODES=${SLURM_NODES:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s.%N)

die() { echo "start_slurm.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as root here)"
case "$AUTH" in none|munge) ;; *) die "SLURM_AUTH must be none or munge, got '$AUTH'";; esac
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODES must be a positive integer, got '$NODES'"

# ---- packages: install only what is missing -------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge)
[ "$WITH_MPI" = 1 ] && PKGS+=(openmpi-bin libopenmpi-dev libpmix2)
[ "$NODES" -gt 1 ] && PKGS+=(iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing packages: ${missing[*]} (apt-get install them, or set SLURM_INSTALL=1)"
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  # No systemd here: keep the packages' maintainer scripts from starting daemons (we start our own).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  echo "start_slurm.sh: installing ${missing[*]}"
  apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q \
      --no-install-recommends "${missing[@]}" >/dev/null
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
fi

# ---- configuration --------------------------------------------------------------------------
HOST=$(hostname -s)
NPROC=$(nproc)
CPUS=${SLURM_NODE_CPUS:-$(( NPROC < 2 ? 2 : NPROC ))}
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))   # a bit below the real amount
mkdir -p "$BASE"/{state,spool,log,jobs}
CONF="$BASE/slurm.conf"
if [ "$NODES" = 1 ]; then
  CLUSTER=robertads
  CTLD_HOST="${HOST}(127.0.0.1)"
  NODE_CONF="# One node: this machine.
SlurmdSpoolDir=${BASE}/spool
SlurmdPidFile=${BASE}/state/slurmd.pid
SlurmdLogFile=${BASE}/log/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
else
  # The nodes' network (bridge, namespaces, links; writes $BASE/cluster.env, read back here).
  "$HERE/node.sh" up "$BASE"
  # shellcheck source=/dev/null
  source "$BASE/cluster.env"
  CLUSTER=robertads-mn
  # slurmctld runs in the root network namespace, on the bridge's address, under the hostname rdsctl.
  CTLD_HOST="rdsctl(${RDS_NET}.1)"
  NODE_CONF="# ${NODES} nodes, each in its own network namespace (tests/cluster/node.sh); %n = node name.
SlurmdSpoolDir=${BASE}/spool/%n
SlurmdPidFile=${BASE}/state/slurmd-%n.pid
SlurmdLogFile=${BASE}/log/slurmd-%n.log
# Nodes share /tmp: srun --mpi=pmix's per-job directories must not collide (\"File exists\").
TmpFS=${BASE}/tmp/%n
# A node silent this long is DOWN and its jobs end as NODE_FAIL (requeued with --requeue).
SlurmdTimeout=${SLURMD_TIMEOUT:-10}"
  for i in $(seq 1 "$NODES"); do
    NODE_CONF+="
NodeName=rdsnode$i NodeAddr=${RDS_NET}.$((i + 1)) NodeHostname=rdsnode$i"
    NODE_CONF+=" CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN"
  done
  NODE_CONF+="
PartitionName=debug Nodes=rdsnode[1-${NODES}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
fi
cat > "$CONF" <<CONF
# Written by roberta-ds tests/cluster/start_slurm.sh: a ${NODES}-node test cluster.
ClusterName=${CLUSTER}
SlurmctldHost=${CTLD_HOST}
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/${AUTH}
CredType=cred/${AUTH}
# A job killed by \`scontrol requeue\` (e.g. its own, after a signal-triggered save) has its credential
# revoked until it expires: only then can it start again. 10 s instead of 120 keeps requeue tests short.
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-10}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60): a requeued job starts soon after it may.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# config_overrides: trust the CPUs below even on a 1-core CI runner (node not drained).
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=${BASE}/state
SlurmctldPidFile=${BASE}/state/slurmctld.pid
SlurmctldLogFile=${BASE}/log/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=300
KillWait=5
InactiveLimit=0
MessageTimeout=10
${NODE_CONF}
CONF
export SLURM_CONF="$CONF"
echo "export SLURM_CONF=$CONF" > "$BASE/env.sh"

# ---- daemons --------------------------------------------------------------------------------
if [ "$AUTH" = munge ]; then
  if [ -s /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    echo "start_slurm.sh: reusing the running munged (pid $(cat /run/munge/munged.pid)); not ours to stop"
  else
    [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null || \
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
    runuser -u munge -- /usr/sbin/munged            # daemonizes; pid in /run/munge/munged.pid
    cp /run/munge/munged.pid "$BASE/state/munged.pid"   # ours: stop_slurm.sh stops it
  fi
  munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
fi
if [ "$NODES" = 1 ]; then
  /usr/sbin/slurmctld -c -f "$CONF"               # -c: clean state; daemonizes
else
  # Its own UTS namespace, so that its hostname is the SlurmctldHost name (the machine's stays).
  # shellcheck disable=SC2016  # $0 expands in the inner shell
  unshare --uts sh -c 'hostname rdsctl && exec /usr/sbin/slurmctld -c -f "$0"' "$CONF"
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || die "slurmctld did not come up; see $BASE/log/slurmctld.log"
if [ "$NODES" = 1 ]; then
  /usr/sbin/slurmd -f "$CONF"                     # daemonizes
else
  for i in $(seq 1 "$NODES"); do "$HERE/node.sh" start "$BASE" "rdsnode$i"; done
fi
# Wait until every node has registered and a real step runs on all of them.
ok=0 t_wait=$(date +%s)
for _ in $(seq 150); do
  if timeout 10 srun -N"$NODES" --ntasks-per-node=1 --immediate=5 true 2>/dev/null; then ok=1; break; fi
  sleep 0.2
done
[ "$ok" = 1 ] || die "no job step ran on all ${NODES} node(s) within $(( $(date +%s) - t_wait )) s;" \
                     "see $BASE/log/slurmd*.log and $BASE/log/slurmctld.log"
sinfo
echo "slurm up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}') s" \
     "(${NODES} node(s), auth=$AUTH, base=$BASE, ports $CTLD_PORT/$SLURMD_PORT)"
echo "source $BASE/env.sh   # sets SLURM_CONF for sbatch/srun/squeue"
