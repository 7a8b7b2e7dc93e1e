#!/bin/bash
# The nodes of a multi-node test cluster (start_slurm.sh with SLURM_NODES=N >= 2) on ONE machine.
#
# Each node is a network namespace with its own address (eth0, one end of a veth pair whose other
# end is on a bridge in the root namespace, where slurmctld listens), plus a UTS namespace (its own
# hostname rdsnode1, rdsnode2, ...) and a mount namespace in which:
#   /etc/hosts      <- $BASE/hosts (every node's name and address; the real /etc/hosts is untouched)
#   /sys/class/net  <- a sysfs mounted inside the node's network namespace (tasks see eth0 and lo only)
#   /dev/shm        <- a tmpfs of its own (as on separate machines; freed with the namespace)
# slurmd runs there, so every job step, batch script and rank it starts inherits all of it. The rest
# of the filesystem (/tmp, the checkout, the venv) is shared, as on a cluster with a shared FS.
# Nodes have no default route: they reach only the cluster's subnet and their own loopback.
#
#   node.sh up BASE                create the bridge and the nodes' namespaces and links (start_slurm.sh)
#   node.sh start BASE NODE        start (or restart) slurmd of NODE inside its namespaces
#   node.sh crash BASE NODE        SIGKILL every process in NODE's network namespace (slurmd, steps, ranks)
#   node.sh cut BASE NODE          network partition: NODE's link down (root side of its veth)
#   node.sh heal BASE NODE         ... and up again
#   node.sh run BASE NODE CMD...   run CMD on NODE (its network, hostname and /etc/hosts), e.g. `ss -tn`
#   node.sh down BASE              delete what `up` made; safe to run twice (stop_slurm.sh)
#
# `up` writes $BASE/cluster.env first (names, subnet, what it created), so `down` undoes exactly that,
# also after a start that failed half-way. Settings for `up` (environment):
#   SLURM_NODES   number of nodes (2..13)
#   SLURM_NET     the /28 to use, e.g. 10.211.7.0 (default: the first 10.211.X.0/28 that no address
#                 or route on this machine overlaps). .1 is the bridge (slurmctld), node i is .(i+1).
set -euo pipefail

die() { echo "node.sh: $*" >&2; exit 1; }
usage() { sed -n '15,21p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 BASE=$2
ENV_FILE="$BASE/cluster.env"

ip2int() { local IFS=.; read -r a b c d <<< "$1"; echo $(( (a << 24) | (b << 16) | (c << 8) | d )); }

# overlaps A/M B/N: true if the two prefixes share an address.
overlaps() {
  local a=${1%/*} m=${1#*/} b=${2%/*} n=${2#*/} p
  [ "$1" = "$a" ] && m=32
  [ "$2" = "$b" ] && n=32
  p=$(( m < n ? m : n ))
  (( p == 0 )) && return 0
  local mask=$(( (0xffffffff << (32 - p)) & 0xffffffff ))
  (( ($(ip2int "$a") & mask) == ($(ip2int "$b") & mask) ))
}

# subnet_free A/M: nothing on this machine (addresses, routes of any table, default routes excepted)
# overlaps it.
subnet_free() {
  local used
  used=$( { ip -4 -o addr show | awk '{print $4}'
            ip -4 route show table all | awk '{ d = $1 }
              d ~ /^(local|broadcast|unicast|unreachable|blackhole|prohibit|multicast|anycast|throw|nat)$/ {
                d = $2 }
              d != "default" { print d }'; } | sort -u)
  local u
  for u in $used; do overlaps "$1" "$u" && return 1; done
  return 0
}

# wait_gone PID: until PID has exited (a zombie counts as gone), at most 5 s.
wait_gone() {
  local _
  for _ in $(seq 50); do
    [ -e "/proc/$1" ] || return 0
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ] && return 0
    sleep 0.1
  done
}

load_env() {
  [ -f "$ENV_FILE" ] || die "$ENV_FILE not found: no multi-node cluster was started under $BASE"
  # shellcheck source=/dev/null
  source "$ENV_FILE"
}

# node_index NODE -> i (rdsnode3 -> 3), checked against the cluster's node count.
node_index() {
  local i=${1#rdsnode}
  if ! [[ "$i" =~ ^[0-9]+$ ]] || (( i < 1 || i > RDS_NODES )); then
    die "no node '$1' (nodes: rdsnode1..rdsnode$RDS_NODES)"
  fi
  echo "$i"
}
netns_of() { echo "rds${RDS_ID}n$(node_index "$1")"; }
veth_of() { echo "rds${RDS_ID}v$(node_index "$1")"; }

case $cmd in
up)
  N=${SLURM_NODES:?SLURM_NODES is not set}
  if ! [[ "$N" =~ ^[0-9]+$ ]] || (( N < 2 || N > 13 )); then die "SLURM_NODES must be 2..13, got '$N'"; fi
  for c in ip nsenter unshare mount; do command -v "$c" >/dev/null || die "'$c' is not installed"; done
  [ -f "$ENV_FILE" ] && die "$ENV_FILE exists: a cluster was already started under $BASE (stop it first)"
  if [ -n "${SLURM_NET:-}" ]; then
    NET=${SLURM_NET%.0}
    subnet_free "$NET.0/28" \
      || die "SLURM_NET=$NET.0/28 overlaps an address or route on this machine (ip -4 addr; ip -4 route)"
  else
    NET=""
    for x in $(seq 7 254); do
      if subnet_free "10.211.$x.0/28"; then NET=10.211.$x; break; fi
    done
    [ -n "$NET" ] || die "no free 10.211.X.0/28 on this machine; set SLURM_NET"
  fi
  # A short id keeps two clusters' link and namespace names apart (e.g. two test sessions at once).
  ID=$(printf '%s' "$BASE" | md5sum | cut -c1-4)
  BR="rds${ID}br"
  ip link show "$BR" >/dev/null 2>&1 && die "link $BR exists: another cluster uses the id $ID"
  mkdir -p "$BASE"/{state,log,spool,tmp,run}
  own_netns_dir=0 own_netns_mnt=0
  [ -d /run/netns ] || own_netns_dir=1
  mountpoint -q /run/netns 2>/dev/null || own_netns_mnt=1
  cat > "$ENV_FILE" <<ENV
# Written by tests/cluster/node.sh up: what \`node.sh down\` removes.
RDS_NODES=$N
RDS_NET=$NET
RDS_ID=$ID
RDS_BRIDGE=$BR
RDS_OWN_NETNS_DIR=$own_netns_dir
RDS_OWN_NETNS_MNT=$own_netns_mnt
ENV
  {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    echo "$NET.1 rdsctl"
    for i in $(seq 1 "$N"); do echo "$NET.$((i + 1)) rdsnode$i"; done
  } > "$BASE/hosts"
  ip link add "$BR" type bridge
  ip link set "$BR" addrgenmode none    # no IPv6 link-local chatter on the cluster's links
  ip addr add "$NET.1/28" dev "$BR"
  ip link set "$BR" up
  for i in $(seq 1 "$N"); do
    ns="rds${ID}n$i" v="rds${ID}v$i"
    ip netns add "$ns"
    ip link add "$v" type veth peer name eth0 netns "$ns"
    ip link set "$v" addrgenmode none
    ip link set "$v" master "$BR" up
    ip -n "$ns" link set eth0 addrgenmode none
    ip -n "$ns" addr add "$NET.$((i + 1))/28" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    mkdir -p "$BASE/spool/rdsnode$i" "$BASE/tmp/rdsnode$i" "$BASE/run/sys-rdsnode$i"
  done
  echo "node.sh: $N nodes rdsnode1..rdsnode$N on $NET.0/28 (bridge $BR at $NET.1)"
  ;;
start)
  load_env
  [ $# -ge 3 ] || usage
  n=$3 ns=$(netns_of "$3")
  pidfile="$BASE/state/slurmd-$n.pid"
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    die "slurmd of $n is running (pid $(cat "$pidfile"))"
  fi
  # nsenter into the network namespace, NOT `ip netns exec`: that remounts /sys, hiding
  # /sys/fs/cgroup, and slurmd exits "Unable to initialize cgroup plugin" even with proctrack/linuxproc.
  # shellcheck disable=SC2016  # expanded by the inner shell
  nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c '
    set -e
    mount --bind "$1/hosts" /etc/hosts
    mount -t sysfs sysfs "$1/run/sys-$2"
    mount --bind "$1/run/sys-$2/class/net" /sys/class/net
    mount -t tmpfs -o mode=1777,size=4g tmpfs /dev/shm
    hostname "$2"
    exec /usr/sbin/slurmd -f "$1/slurm.conf"' sh "$BASE" "$n"      # slurmd daemonizes
  ;;
crash)
  load_env
  ns=$(netns_of "$3")
  pids=$(ip netns pids "$ns")
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
  for p in $pids; do wait_gone "$p"; done
  ;;
cut)  load_env; ip link set "$(veth_of "$3")" down ;;
heal) load_env; ip link set "$(veth_of "$3")" up ;;
run)
  load_env
  [ $# -ge 4 ] || usage
  n=$3 ns=$(netns_of "$3"); shift 3
  # shellcheck disable=SC2016
  exec nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c '
    mount --bind "$1/hosts" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$BASE" "$n" "$@"
  ;;
down)
  [ -f "$ENV_FILE" ] || exit 0
  load_env
  for i in $(seq 1 "$RDS_NODES"); do
    ns="rds${RDS_ID}n$i"
    if [ -e "/run/netns/$ns" ]; then
      # Whatever is left in the node (job steps whose slurmd is gone): nothing may outlive the cluster.
      pids=$(ip netns pids "$ns" 2>/dev/null)
      for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
      for p in $pids; do wait_gone "$p"; done
      ip link del "rds${RDS_ID}v$i" 2>/dev/null || true    # deleting one end removes its peer too
      ip netns del "$ns"
    fi
  done
  ip link del "$RDS_BRIDGE" 2>/dev/null || true
  if [ -d /run/netns ] && [ -z "$(ls -A /run/netns)" ]; then
    if [ "$RDS_OWN_NETNS_MNT" = 1 ]; then umount /run/netns 2>/dev/null || true; fi
    if [ "$RDS_OWN_NETNS_DIR" = 1 ]; then rmdir /run/netns 2>/dev/null || true; fi
  fi
  rm -f "$ENV_FILE"
  ;;
*) usage ;;
esac
