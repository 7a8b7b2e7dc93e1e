"""The rendezvous network checks (roberta_ds.launch.net) on made-up hosts, and the real port check.

The made-up hosts are what `tests/cluster/node.sh` builds for real (test_slurm_multinode.py runs
these checks there, in the templates' preflight and in the trainer): a node `n2` with eth0
10.0.0.3 and lo, whose hostname resolves through /etc/hosts.
"""

from __future__ import annotations

import errno
import socket

import pytest

from roberta_ds.errors import ConfigError
from roberta_ds.launch import net as dist_net
from roberta_ds.launch.dist import DistEnv
from roberta_ds.launch.net import (
    Interface,
    Probe,
    check_network,
    check_rendezvous_network,
    check_rendezvous_port,
)

IFACES = [
    Interface("lo", "127.0.0.1", True),
    Interface("eth0", "10.0.0.3", False),
    Interface("docker0", "172.17.0.1", False),
]
HOSTS = {"n1": ["10.0.0.2"], "n2": ["10.0.0.3"], "localhost": ["127.0.0.1", "::1"]}


def probe(
    hosts: dict[str, list[str]] = HOSTS,
    host: str = "n2",
    bindable: tuple[str, ...] = ("10.0.0.3", "127.0.0.1", "127.0.1.1", "0.0.0.0"),
) -> Probe:
    def can_bind(address: str, port: int) -> OSError | None:
        return None if address in bindable else OSError(errno.EADDRNOTAVAIL, "not here")

    return Probe(host=host, interfaces=lambda: IFACES, resolve=lambda h: hosts.get(h, []), can_bind=can_bind)


def test_gloo_binds_the_hostnames_address_across_nodes():
    assert check_network(True, "n1", "gloo", {}, probe()) == "gloo 10.0.0.3 (hostname n2)"
    # GLOO_SOCKET_IFNAME names the interface; a comma list's first carries the rendezvous.
    assert check_network(True, "n1", "gloo", {"GLOO_SOCKET_IFNAME": "eth0,lo"}, probe()) == (
        "gloo 10.0.0.3 (eth0, GLOO_SOCKET_IFNAME)"
    )
    # NCCL runs do not use gloo: nothing to describe, nothing about gloo checked.
    assert check_network(True, "n1", "nccl", {}, probe(hosts={**HOSTS, "n2": ["127.0.1.1"]})) == ""


def test_hostname_on_loopback_is_refused_across_nodes_naming_host_and_fix():
    debian = probe(hosts={**HOSTS, "n2": ["127.0.1.1"]})  # Debian's `127.0.1.1 n2` line in /etc/hosts
    with pytest.raises(ConfigError) as e:
        check_network(True, "n1", "gloo", {}, debian)
    msg = str(e.value)
    assert "gloo would use 127.0.1.1 (hostname n2) on n2: a loopback address" in msg
    assert "GLOO_SOCKET_IFNAME" in msg and "eth0 10.0.0.3" in msg, msg
    # One node: loopback is where the ranks meet, fine.
    assert check_network(False, "127.0.0.1", "gloo", {}, debian) == "gloo 127.0.1.1 (hostname n2)"
    # A hostname with no address of this host: torch falls back to 127.0.0.1, refused across nodes too.
    stale = probe(hosts={**HOSTS, "n2": ["10.9.9.9"]})
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1 \(hostname n2 has no address of this host"):
        check_network(True, "n1", "gloo", {}, stale)
    with pytest.raises(ConfigError, match="hostname n2 has no address"):
        check_network(True, "n1", "gloo", {}, probe(hosts={"n1": ["10.0.0.2"]}))


def test_gloo_interface_missing_or_loopback_is_refused():
    with pytest.raises(ConfigError) as e:
        check_network(False, "127.0.0.1", "gloo", {"GLOO_SOCKET_IFNAME": "ib0"}, probe())
    assert str(e.value).startswith(
        "GLOO_SOCKET_IFNAME=ib0: n2 has no interface 'ib0' (interfaces: lo 127.0.0.1, "
        "eth0 10.0.0.3, docker0 172.17.0.1)"
    ), e.value
    with pytest.raises(ConfigError, match=r"gloo would use 127\.0\.0\.1 \(lo, GLOO_SOCKET_IFNAME\) on n2"):
        check_network(True, "n1", "gloo", {"GLOO_SOCKET_IFNAME": "lo"}, probe())
    # The backend unknown (a GPU job's preflight): an explicit GLOO_SOCKET_IFNAME is still checked.
    with pytest.raises(ConfigError, match="no interface 'ib0'"):
        check_network(True, "n1", None, {"GLOO_SOCKET_IFNAME": "ib0"}, probe())
    assert check_network(True, "n1", None, {}, probe(hosts={**HOSTS, "n2": ["127.0.1.1"]})) == ""


def test_master_addr_must_resolve_off_loopback_across_nodes():
    with pytest.raises(ConfigError, match="MASTER_ADDR=n9 does not resolve on n2"):
        check_network(True, "n9", "gloo", {}, probe())
    with pytest.raises(
        ConfigError, match=r"MASTER_ADDR=localhost is a loopback address \(127\.0\.0\.1\) on n2"
    ):
        check_network(True, "localhost", "gloo", {}, probe())
    assert check_network(False, "localhost", "gloo", {}, probe()) == "gloo 10.0.0.3 (hostname n2)"


@pytest.mark.parametrize(
    "value, error",
    [
        ("ib", "NCCL_SOCKET_IFNAME=ib: no interface on n2 matches it"),
        ("=eth", "NCCL_SOCKET_IFNAME==eth: no interface on n2 matches it"),  # '=': exact names only
        ("lo", "NCCL_SOCKET_IFNAME=lo selects only loopback on n2"),
        ("eth", None),
        ("=eth0", None),
        ("^docker,lo", None),
        ("eth,lo", None),
    ],
)
def test_nccl_socket_ifname(value, error):
    if error is None:
        assert check_network(True, "n1", "nccl", {"NCCL_SOCKET_IFNAME": value}, probe()) == ""
    else:
        with pytest.raises(ConfigError, match=error):
            check_network(True, "n1", "nccl", {"NCCL_SOCKET_IFNAME": value}, probe())


def test_busy_rendezvous_port_is_named_with_host_and_port():
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with pytest.raises(ConfigError) as e:
            check_rendezvous_port("n1", port, Probe(host="n1"))
        assert f"rendezvous port {port} on n1 (MASTER_ADDR=n1, rank 0's host) is in use" in str(e.value)
        assert "MASTER_PORT" in str(e.value)
    check_rendezvous_port("n1", port, Probe(host="n1"))  # free again


def test_trainer_checks_port_on_rank_0_only_and_not_under_torchrun():
    seen: list[int] = []

    def can_bind(address: str, port: int) -> OSError | None:
        seen.append(port)
        return OSError(errno.EADDRINUSE, "in use") if port == 29500 else None

    p = Probe(
        host="n1", interfaces=lambda: IFACES, resolve=lambda h: HOSTS.get(h, ["10.0.0.2"]), can_bind=can_bind
    )
    env0 = DistEnv(0, 4, 0, 2, "n1", 29500, "slurm")
    with pytest.raises(ConfigError, match="rendezvous port 29500 on n1"):
        check_rendezvous_network(env0, "gloo", {}, p)
    assert check_rendezvous_network(DistEnv(2, 4, 0, 2, "n1", 29500, "slurm"), "nccl", {}, p) == ""
    # torchrun's agent already listens on MASTER_PORT: its store is the rendezvous, not a squatter.
    check_rendezvous_network(env0, "nccl", {"TORCHELASTIC_USE_AGENT_STORE": "True"}, p)
    assert check_rendezvous_network(DistEnv(0, 1, 0, 1, "n1", 29500, "single"), "gloo", {}, p) == ""


def test_local_interfaces_and_resolve_on_this_machine():
    ifaces = {i.name: i for i in dist_net.local_interfaces()}
    assert ifaces["lo"].loopback and ifaces["lo"].ipv4 == "127.0.0.1"
    assert "127.0.0.1" in dist_net.resolve("localhost")
    assert dist_net.resolve("no-such-host.invalid") == []
    assert dist_net.can_bind("127.0.0.1", 0) is None
    assert dist_net.can_bind("203.0.113.7", 0).errno == errno.EADDRNOTAVAIL  # TEST-NET-3: no host has it
