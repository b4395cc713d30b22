"""Fabric detection (runtime/fabric.py) on fake /sys/class/infiniband trees and captured ibdev2netdev
output."""

from __future__ import annotations

from dynamo_lite.runtime import fabric

# A DGX Spark's ConnectX-7 as ibdev2netdev shows it (from the Spark cluster project's docs).
IBDEV2NETDEV = """mlx5_0 port 1 ==> enp1s0f0np0 (Down)
mlx5_1 port 1 ==> enp1s0f1np1 (Up)
"""


def fake_sysfs(root, hcas):
    """hcas: {hca: (state, link_layer, netdev or "")}, one port each."""
    for hca, (state, link_layer, netdev) in hcas.items():
        port = root / hca / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text(state + "\n")
        (port / "link_layer").write_text(link_layer + "\n")
        (port / "rate").write_text("200 Gb/sec (4X HDR)\n")
        if netdev:
            net = root / hca / "device" / "net" / netdev
            net.mkdir(parents=True)
            (net / "dev_port").write_text("0\n")
    return root


SPARK_ADDRESSES = {"lo": ("127.0.0.1",), "enP7s7": ("192.168.1.20",), "enp1s0f1np1": ("169.254.12.3",),
                   "enp1s0f0np0": ()}


def test_a_spark_roce_link_becomes_nccl_and_ucx_settings(tmp_path):
    root = fake_sysfs(tmp_path, {"mlx5_0": ("1: DOWN", "Ethernet", "enp1s0f0np0"),
                                 "mlx5_1": ("4: ACTIVE", "Ethernet", "enp1s0f1np1")})
    fab = fabric.detect(root, addresses=SPARK_ADDRESSES)
    assert [(p.hca, p.state, p.kind, p.netdev) for p in fab.ports] == [
        ("mlx5_0", "DOWN", "RoCE", "enp1s0f0np0"), ("mlx5_1", "ACTIVE", "RoCE", "enp1s0f1np1")]
    assert fabric.settings(fab) == {"NCCL_IB_HCA": "mlx5_1", "UCX_NET_DEVICES": "mlx5_1:1",
                                    "NCCL_SOCKET_IFNAME": "enp1s0f1np1", "GLOO_SOCKET_IFNAME": "enp1s0f1np1"}
    assert fab.rdma_address() == "169.254.12.3"
    assert fabric.warnings(fab, "169.254.12.3") == []
    # Advertising the LAN address sends the peers' traffic over plain Ethernet.
    (warning,) = fabric.warnings(fab, "192.168.1.20")
    assert "on enP7s7" in warning and "plain Ethernet" in warning and "advertise 169.254.12.3" in warning
    # The operator's own settings win.
    assert "NCCL_IB_HCA" not in fabric.environment(fab, {"NCCL_IB_HCA": "mlx5_0"})


def test_ibdev2netdev_output_names_the_netdevs(tmp_path):
    root = fake_sysfs(tmp_path, {"mlx5_0": ("1: DOWN", "Ethernet", ""),
                                 "mlx5_1": ("4: ACTIVE", "Ethernet", "")})
    fab = fabric.detect(root, IBDEV2NETDEV, SPARK_ADDRESSES)
    assert [(p.hca, p.active, p.netdev, p.kind) for p in fab.ports] == [
        ("mlx5_0", False, "enp1s0f0np0", "RoCE"), ("mlx5_1", True, "enp1s0f1np1", "RoCE")]
    assert fabric.settings(fab)["NCCL_SOCKET_IFNAME"] == "enp1s0f1np1"


def test_no_adapter_or_no_link_warns_of_plain_ethernet(tmp_path):
    none = fabric.detect(tmp_path / "absent", addresses={"eth0": ("10.0.0.2",)})
    assert fabric.settings(none) == {}
    assert "plain Ethernet" in fabric.warnings(none)[0]
    down = fabric.detect(fake_sysfs(tmp_path / "ib", {"mlx5_0": ("1: DOWN", "InfiniBand", "ib0")}),
                         addresses={"ib0": ("10.1.0.2",)})
    (warning,) = fabric.warnings(down)
    assert "no InfiniBand/RoCE link is up" in warning and "mlx5_0 port 1 (ib0: DOWN)" in warning


def test_an_active_port_without_an_address_is_named(tmp_path):
    fab = fabric.detect(fake_sysfs(tmp_path, {"mlx5_0": ("4: ACTIVE", "InfiniBand", "ib0")}),
                        addresses={"ib0": ()})
    assert fabric.settings(fab) == {"NCCL_IB_HCA": "mlx5_0", "UCX_NET_DEVICES": "mlx5_0:1"}
    assert "no IPv4 address" in fabric.warnings(fab)[0]
