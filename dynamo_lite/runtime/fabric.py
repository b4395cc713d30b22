"""The host's fast fabric: InfiniBand / RoCE HCAs, the network interfaces they drive and their addresses,
turned into the settings NCCL, Gloo, UCX and NIXL read (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, UCX_NET_DEVICES).

What a DGX Spark owner otherwise does by hand (`ibdev2netdev`, `ip addr show`, then exports): read
/sys/class/infiniband/<hca>/ports/<n>/{state,link_layer,rate} and /sys/class/infiniband/<hca>/device/net/
(the netdev of each HCA, as ibdev2netdev finds it), or parse captured `ibdev2netdev` output, and the
interfaces' addresses (psutil). A Spark pair's direct QSFP link usually carries link-local 169.254.x.y
addresses: those are the ones to advertise and to name in NCCL_SOCKET_IFNAME.

Without an active HCA, tensor-parallel traffic (NCCL) and KV transfers (UCX) go over plain TCP sockets:
`warnings` says so. Pure functions over a sysfs root and address tables, so tests give fake trees.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SYSFS_INFINIBAND = "/sys/class/infiniband"
LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")
_IBDEV2NETDEV = re.compile(r"^(\S+)\s+port\s+(\d+)\s+==>\s+(\S+)\s+\((\w+)\)")


@dataclass(frozen=True)
class HcaPort:
    """One port of an RDMA adapter (InfiniBand, or RoCE when link_layer is Ethernet)."""

    hca: str  # "mlx5_0"
    port: int
    state: str  # "ACTIVE", "DOWN", "INIT", ...
    link_layer: str  # "InfiniBand" | "Ethernet" (RoCE)
    netdev: str = ""  # the network interface it drives ("enp1s0f1np1"), "" if none
    rate: str = ""  # "200 Gb/sec (4X HDR)"

    @property
    def active(self) -> bool:
        return self.state.upper() in ("ACTIVE", "UP")

    @property
    def kind(self) -> str:
        return "RoCE" if self.link_layer.lower() == "ethernet" else "InfiniBand"


@dataclass(frozen=True)
class Fabric:
    ports: tuple[HcaPort, ...] = ()
    addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # interface -> IPv4 addresses

    @property
    def active_ports(self) -> list[HcaPort]:
        return [p for p in self.ports if p.active]

    def rdma_interfaces(self) -> list[str]:
        """Interfaces of active HCA ports that carry an IPv4 address, link-local (a Spark pair's direct
        cable) first."""
        names = [p.netdev for p in self.active_ports if p.netdev and self.addresses.get(p.netdev)]
        names = list(dict.fromkeys(names))
        return sorted(names, key=lambda n: not any(_link_local(a) for a in self.addresses[n]))

    def rdma_address(self) -> str:
        """The address to advertise so that peers reach this host over the fabric ("" if none)."""
        for name in self.rdma_interfaces():
            addrs = sorted(self.addresses[name], key=lambda a: not _link_local(a))
            return addrs[0]
        return ""

    def interface_of(self, address: str) -> str:
        """The local interface holding `address` ("" if none here)."""
        return next((name for name, addrs in self.addresses.items() if address in addrs), "")


def _link_local(address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in LINK_LOCAL
    except ValueError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def read_sysfs(root: str | Path = SYSFS_INFINIBAND) -> list[HcaPort]:
    """Every HCA port under `root` (/sys/class/infiniband); [] when there is none."""
    base = Path(root)
    if not base.is_dir():
        return []
    ports = []
    for hca in sorted(base.iterdir()):
        net = hca / "device" / "net"
        netdevs = sorted(p.name for p in net.iterdir()) if net.is_dir() else []
        for port_dir in sorted((hca / "ports").glob("*")):
            if not port_dir.name.isdigit():
                continue
            number = int(port_dir.name)
            # state reads "4: ACTIVE"; an HCA with one netdev per port lists them in port order.
            state = _read(port_dir / "state").split(":")[-1].strip() or "UNKNOWN"
            netdev = _port_netdev(net, netdevs, number)
            ports.append(HcaPort(hca.name, number, state, _read(port_dir / "link_layer") or "InfiniBand",
                                 netdev, _read(port_dir / "rate")))
    return ports


def _port_netdev(net: Path, netdevs: list[str], port: int) -> str:
    """The netdev of `port`: the one whose dev_port (0-based) matches, else the only one."""
    for name in netdevs:
        dev_port = _read(net / name / "dev_port")
        if dev_port.isdigit() and int(dev_port) == port - 1:
            return name
    return netdevs[0] if len(netdevs) == 1 else ""


def parse_ibdev2netdev(output: str, sysfs: list[HcaPort] = ()) -> list[HcaPort]:
    """Ports from `ibdev2netdev` lines ("mlx5_0 port 1 ==> enp1s0f1np1 (Up)"); link layer and rate from
    the sysfs ports of the same HCA and port when known."""
    known = {(p.hca, p.port): p for p in sysfs}
    ports = []
    for line in output.splitlines():
        m = _IBDEV2NETDEV.match(line.strip())
        if not m:
            continue
        hca, port, netdev, state = m[1], int(m[2]), m[3], m[4]
        seen = known.get((hca, port))
        ports.append(HcaPort(hca, port, "ACTIVE" if state.lower() == "up" else state.upper(),
                             seen.link_layer if seen else "InfiniBand", netdev, seen.rate if seen else ""))
    return ports


def local_ipv4_addresses() -> dict[str, tuple[str, ...]]:
    """{interface: IPv4 addresses} of this host (psutil)."""
    import psutil

    return {name: tuple(a.address for a in addrs if a.family == socket.AF_INET)
            for name, addrs in psutil.net_if_addrs().items()}


def detect(sysfs_root: str | Path = SYSFS_INFINIBAND, ibdev2netdev_output: str | None = None,
           addresses: Mapping[str, tuple[str, ...]] | None = None) -> Fabric:
    """This host's fabric. `ibdev2netdev_output`, when given, names the netdevs (sysfs still gives state
    and link layer); `addresses` defaults to the live interfaces."""
    ports = read_sysfs(sysfs_root)
    if ibdev2netdev_output:
        ports = parse_ibdev2netdev(ibdev2netdev_output, ports) or ports
    return Fabric(tuple(ports), dict(local_ipv4_addresses() if addresses is None else addresses))


def settings(fabric: Fabric) -> dict[str, str]:
    """NCCL / Gloo / UCX settings that keep traffic on the fabric; {} when there is no active HCA port.

    NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME (vLLM's and Ray's bootstrap and CPU collectives) name the
    RDMA interfaces; NCCL_IB_HCA the active HCAs (NCCL then moves tensors over IB verbs, not sockets);
    UCX_NET_DEVICES the HCA ports (NIXL's UCX backend, and so vLLM's NixlConnector, uses only those).
    """
    active = fabric.active_ports
    if not active:
        return {}
    out = {"NCCL_IB_HCA": ",".join(dict.fromkeys(p.hca for p in active)),
           "UCX_NET_DEVICES": ",".join(f"{p.hca}:{p.port}" for p in active)}
    interfaces = fabric.rdma_interfaces()
    if interfaces:
        out["NCCL_SOCKET_IFNAME"] = out["GLOO_SOCKET_IFNAME"] = ",".join(interfaces)
    return out


def environment(fabric: Fabric, environ: Mapping[str, str]) -> dict[str, str]:
    """settings() the operator did not set already (theirs win)."""
    return {k: v for k, v in settings(fabric).items() if k not in environ}


def warnings(fabric: Fabric, advertise_host: str = "") -> list[str]:
    """What would send tensor-parallel or KV traffic over plain Ethernet, one sentence each."""
    out = []
    if not fabric.ports:
        out.append("no InfiniBand/RoCE adapter (/sys/class/infiniband is empty): NCCL and NIXL/UCX traffic "
                   "between hosts goes over plain Ethernet (TCP sockets)")
        return out
    down = [f"{p.hca} port {p.port} ({p.netdev or 'no netdev'}: {p.state})" for p in fabric.ports
            if not p.active]
    if not fabric.active_ports:
        out.append(f"no InfiniBand/RoCE link is up ({', '.join(down)}): traffic between hosts goes over "
                   "plain Ethernet; check the cable and `ibdev2netdev`")
        return out
    if not fabric.rdma_interfaces():
        names = ", ".join(p.netdev or p.hca for p in fabric.active_ports)
        out.append(f"the active RDMA ports ({names}) have no IPv4 address: give the interface an address "
                   "(a Spark pair's direct link uses 169.254.x.y) so peers can reach it")
    if advertise_host and advertise_host not in ("127.0.0.1", "localhost"):
        where = fabric.interface_of(advertise_host)
        if where and where not in fabric.rdma_interfaces():
            better = fabric.rdma_address()
            instead = f"; advertise {better} instead" if better else ""
            out.append(f"the advertised address {advertise_host} is on {where}, not on the RDMA fabric: "
                       f"peers reach this host over plain Ethernet{instead}")
    return out


def describe(fabric: Fabric) -> list[str]:
    """One line per HCA port, as a report shows it."""
    lines = []
    for p in fabric.ports:
        addrs = ", ".join(fabric.addresses.get(p.netdev, ())) or "no IPv4 address"
        lines.append(f"{p.hca} port {p.port} {p.kind} {p.state}{' ' + p.rate if p.rate else ''} ==> "
                     f"{p.netdev or '?'} ({addrs})")
    return lines
