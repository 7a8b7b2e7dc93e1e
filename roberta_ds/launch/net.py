"""The network side of the rendezvous: which address this rank's collectives use, checked before any
process group is built.

Across nodes, three mistakes make ranks wait on each other until a timeout, or fail with an error
that names a loopback address and not the cause:
- gloo (CPU runs) binds the first usable address of this host's name, or of GLOO_SOCKET_IFNAME's
  interface. A hostname mapped to a loopback address (Debian's `127.0.1.1 host` line) or
  GLOO_SOCKET_IFNAME=lo makes each rank advertise 127.x: ranks on other nodes then connect to their
  own loopback. A name that does not resolve makes torch fall back to 127.0.0.1 with a warning.
- MASTER_ADDR naming a loopback address (`localhost`) or a host this node cannot resolve.
- The rendezvous port taken on rank 0's host (another job, a stale process): rank 0 cannot listen,
  and the other ranks may connect to whoever holds the port and wait.
NCCL picks its interfaces itself (not lo or docker*), unless NCCL_SOCKET_IFNAME says otherwise.

`check_network` refuses these with a ConfigError that names the host, the variable, the address or
port and the fix, and otherwise says what gloo will bind ("gloo 10.1.2.3 (hostname node07)") for
the log. `check_rendezvous_port` is rank 0's check of its port. The trainer runs both before
`init_process_group` (`check_rendezvous_network`); `python -m roberta_ds.dist` (the templates'
preflight) runs `check_network`.
Lookups are injectable (`Probe`), so the decisions are pure and unit-tested.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from roberta_ds.errors import ConfigError

if TYPE_CHECKING:
    from roberta_ds.launch.dist import DistEnv


@dataclass(frozen=True)
class Interface:
    name: str
    ipv4: str | None
    """Its first IPv4 address, or None."""
    loopback: bool


def _ipv4_of(name: str) -> str | None:
    """The interface's IPv4 address (ioctl SIOCGIFADDR; Linux), or None when it has none."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def local_interfaces() -> list[Interface]:
    """This network namespace's interfaces with their IPv4 addresses (what getifaddrs would list)."""
    out = []
    for _, name in socket.if_nameindex():
        ip = _ipv4_of(name)
        out.append(Interface(name, ip, name == "lo" or (ip is not None and is_loopback(ip))))
    return out


def resolve(host: str) -> list[str]:
    """Addresses of `host` in getaddrinfo's order (the order gloo and TCPStore try them); [] if none."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    seen: list[str] = []
    for *_, sockaddr in infos:
        if sockaddr[0] not in seen:
            seen.append(str(sockaddr[0]))
    return seen


def can_bind(address: str, port: int = 0) -> OSError | None:
    """None if a TCP socket can bind `address`:`port` here (SO_REUSEADDR, as gloo and TCPStore set it),
    else the OSError (EADDRINUSE: taken; EADDRNOTAVAIL: not an address of this host)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
            s.listen(1)
        except OSError as e:
            return e
    return None


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Probe:
    """What the checks look up on this host; tests pass their own."""

    host: str = field(default_factory=socket.gethostname)
    interfaces: Callable[[], list[Interface]] = local_interfaces
    resolve: Callable[[str], list[str]] = resolve
    can_bind: Callable[[str, int], OSError | None] = can_bind


def _listing(ifaces: list[Interface]) -> str:
    return ", ".join(f"{i.name} {i.ipv4 or '(no IPv4)'}" for i in ifaces) or "none"


def gloo_address(environ: Mapping[str, str], probe: Probe) -> tuple[str | None, str]:
    """(address, how it was chosen) for gloo's sockets, the way torch's ProcessGroupGloo picks it.

    GLOO_SOCKET_IFNAME (a comma list: the first interface carries the rendezvous) names interfaces,
    which must exist; else the first address of the hostname that can be bound; else 127.0.0.1.
    """
    names = [n.strip() for n in environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n.strip()]
    if names:
        ifaces = probe.interfaces()
        by_name = {i.name: i for i in ifaces}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(
                f"GLOO_SOCKET_IFNAME={environ['GLOO_SOCKET_IFNAME']}: {probe.host} has no interface "
                f"{missing[0]!r} (interfaces: {_listing(ifaces)}). Set it to the interface of the network "
                "that connects the nodes, the same name on every node, or unset it to use the address "
                "of the hostname"
            )
        first = by_name[names[0]]
        return first.ipv4, f"{first.name}, GLOO_SOCKET_IFNAME"
    for address in probe.resolve(probe.host):
        if probe.can_bind(address, 0) is None:
            return address, f"hostname {probe.host}"
    return "127.0.0.1", f"hostname {probe.host} has no address of this host: torch falls back to loopback"


def _nccl_interfaces(value: str, ifaces: list[Interface]) -> list[Interface] | None:
    """The interfaces NCCL_SOCKET_IFNAME selects (prefixes, or exact names after '='), or None for an
    exclusion list ('^docker,lo'), which leaves the choice to NCCL."""
    if value.startswith("^"):
        return None
    exact = value.startswith("=")
    names = [n.strip() for n in value.lstrip("=").split(",") if n.strip()]
    return [i for i in ifaces if any(i.name == n if exact else i.name.startswith(n) for n in names)]


def check_network(
    spans_nodes: bool,
    master_addr: str,
    backend: str | None,
    environ: Mapping[str, str],
    probe: Probe | None = None,
) -> str:
    """Refuse a network setting that cannot connect this rank to the others; say what gloo binds.

    spans_nodes: the world has ranks on other nodes (local world < world). backend: "gloo", "nccl", or
    None when not known yet (the preflight on a GPU job): then only the variables set are checked.
    Returns e.g. "gloo 10.1.2.3 (hostname node07)", or "" when gloo is not in use.
    """
    probe = probe or Probe()
    where = f"on {probe.host}"
    addrs = probe.resolve(master_addr) if spans_nodes else []
    if spans_nodes and not addrs:
        raise ConfigError(
            f"MASTER_ADDR={master_addr} does not resolve {where}: rank 0's host must be a name every node "
            "resolves (its /etc/hosts or DNS) or an address; set MASTER_ADDR to rank 0's address"
        )
    if addrs and all(is_loopback(a) for a in addrs):
        raise ConfigError(
            f"MASTER_ADDR={master_addr} is a loopback address ({addrs[0]}) {where}, but the ranks are on "
            "several nodes: they would look for rank 0's rendezvous on their own host. Set MASTER_ADDR "
            "to rank 0's hostname or address on the node network (unset under srun: the first node)"
        )

    described = ""
    if backend == "gloo" or (backend is None and environ.get("GLOO_SOCKET_IFNAME")):
        address, how = gloo_address(environ, probe)
        if spans_nodes and (address is None or is_loopback(address)):
            raise ConfigError(
                f"gloo would use {address or 'no IPv4 address'} ({how}) {where}: a loopback address, but "
                "the ranks are on several nodes, which would connect to their own loopback and fail. Set "
                "GLOO_SOCKET_IFNAME to the interface of the node network "
                f"(here: {_listing(probe.interfaces())}), or map the hostname to its node address in "
                "/etc/hosts"
            )
        described = f"gloo {address} ({how})"

    nccl = environ.get("NCCL_SOCKET_IFNAME", "")
    if nccl and backend in ("nccl", None):
        ifaces = probe.interfaces()
        chosen = _nccl_interfaces(nccl, ifaces)
        if chosen is not None and not chosen:
            raise ConfigError(
                f"NCCL_SOCKET_IFNAME={nccl}: no interface {where} matches it "
                f"(interfaces: {_listing(ifaces)}); NCCL would stop with 'no socket interface found'. "
                "Set it to the node network's interface (a prefix such as ib or eth, or =name for an "
                "exact name)"
            )
        if chosen and spans_nodes and all(i.loopback for i in chosen):
            raise ConfigError(
                f"NCCL_SOCKET_IFNAME={nccl} selects only loopback {where}, but the ranks are on several "
                "nodes. Set it to the node network's interface (interfaces: {_listing(ifaces)})"
            )
    return described


def check_rendezvous_port(master_addr: str, port: int, probe: Probe | None = None) -> None:
    """On rank 0, before the TCPStore listens on `port`: refuse a port something else holds.

    Without this, rank 0 fails with torch's EADDRINUSE naming no host, while the other ranks may
    connect to whatever holds the port and wait for the store's timeout.
    """
    probe = probe or Probe()
    err = probe.can_bind("0.0.0.0", port)
    if err is not None and err.errno == errno.EADDRINUSE:
        raise ConfigError(
            f"rendezvous port {port} on {probe.host} (MASTER_ADDR={master_addr}, rank 0's host) is in use by "
            "another process, so rank 0 cannot listen there: set MASTER_PORT to a free port, or find what "
            f"holds it (`ss -tlnp 'sport = :{port}'` on {probe.host})"
        )


def check_rendezvous_network(
    env: DistEnv, backend: str, environ: Mapping[str, str] | None = None, probe: Probe | None = None
) -> str:
    """The trainer's checks before `init_process_group`: `check_network` on every rank, and on rank 0
    `check_rendezvous_port` unless torchrun's agent already holds the store. Returns what gloo binds
    (for the log), "" for a single process."""
    environ = os.environ if environ is None else environ
    if env.world_size == 1:
        return ""
    net = check_network(env.local_world_size < env.world_size, env.master_addr, backend, environ, probe)
    if env.rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        check_rendezvous_port(env.master_addr, env.master_port, probe)
    return net
