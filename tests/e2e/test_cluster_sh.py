"""launch/cluster.sh for real: two "hosts" (network namespaces joined by a veth pair), sshd with key
authentication in the second, the cluster started from the first: etcd, NATS and the frontend on the head,
a mocker worker on the second host over SSH; start waits until the model answers, status sees it, stop
ends everything on both. Needs root, `ip netns` and openssh-server (scripts/setup.sh --full)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.e2e.harness import DEFAULT_MODEL_PATH, REPO

SSHD = "/usr/sbin/sshd"


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "ssh", "ssh-keygen", "etcd", "nats-server", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.path.exists(SSHD):
        return "openssh-server is not installed (scripts/setup.sh --full)"
    return None


def _wait_for_sshd(sshd: subprocess.Popen, head: str, node_ip: str, log_path, timeout: float = 15) -> None:
    """Until sshd accepts connections from the head host: cluster.sh's first ssh must not race its start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sshd.poll() is not None:
            pytest.fail(f"sshd exited with {sshd.returncode}: {log_path.read_text()}")
        if _run("ip", "netns", "exec", head, "bash", "-c", f"exec 3<>/dev/tcp/{node_ip}/22",
                check=False).returncode == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"sshd did not listen on {node_ip}:22 within {timeout} s: {log_path.read_text()}")


@pytest.fixture
def two_hosts(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.fail(reason)  # CI runs as root with these installed: a missing piece is a failure there
    tag = uuid.uuid4().hex[:6]
    head, node = f"dlch-{tag}", f"dlcn-{tag}"
    subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
    head_ip, node_ip = f"{subnet}.1", f"{subnet}.2"
    sshd = None
    try:
        for ns in (head, node):
            _run("ip", "netns", "add", ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", head, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", node)
        for ns, ip in ((head, head_ip), (node, node_ip)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
        # sshd on the second host: its own host key, our client key authorized, nothing from /etc/ssh.
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "client_key"))
        shutil.copy(tmp_path / "client_key.pub", tmp_path / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        (tmp_path / "sshd_config").write_text(
            f"ListenAddress {node_ip}\nPort 22\nHostKey {tmp_path / 'host_key'}\n"
            f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nStrictModes no\nUsePAM no\n"
            f"PidFile {tmp_path / 'sshd.pid'}\n")
        with open(tmp_path / "sshd.log", "w") as log:
            sshd = subprocess.Popen(["ip", "netns", "exec", node, SSHD, "-D", "-e", "-f",
                                     str(tmp_path / "sshd_config")], stdout=subprocess.DEVNULL, stderr=log)
        _wait_for_sshd(sshd, head, node_ip, tmp_path / "sshd.log")
        yield {"head": head, "node": node, "head_ip": head_ip, "node_ip": node_ip, "dir": tmp_path}
    finally:
        _kill_leftovers(subnet)
        if sshd is not None:
            sshd.terminate()
            sshd.wait(10)
        for ns in (head, node):
            _run("ip", "netns", "del", ns, check=False)


def test_cluster_start_status_stop_over_ssh(two_hosts, tmp_path):
    h = two_hosts
    state = tmp_path / "state"
    ssh_opts = (f"-i {tmp_path / 'client_key'} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o LogLevel=ERROR -o ConnectTimeout=5")
    config = tmp_path / "config.env"
    config.write_text(
        f"HEAD_HOST={h['head_ip']}\nAGG_HOSTS={h['node_ip']}\nSSH_USER=root\nSSH_OPTS='{ssh_opts}'\n"
        f"ENGINE=mocker\nMODEL_PATH={DEFAULT_MODEL_PATH}\nSERVED_MODEL_NAME=mock-model\n"
        f"WORKER_ARGS='--speedup-ratio 50'\nSTATE_DIR={state}\nSTARTUP_TIMEOUT=60\nSTOP_TIMEOUT=15\n"
        f"PYTHON={sys.executable}\n")

    def cluster(command: str) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", h["head"], "bash", str(REPO / "launch" / "cluster.sh"), command,
                    str(config), check=False, timeout=90)

    try:
        started = cluster("start")
        assert started.returncode == 0, started.stdout + started.stderr + _logs(state, h)
        assert f"started worker0 on {h['node_ip']}" in started.stderr
        status = cluster("status")
        assert status.returncode == 0 and "running  worker0" in status.stdout, status.stdout + status.stderr
        body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 4})
        url = f"http://{h['head_ip']}:8000/v1/chat/completions"
        answer = _run("ip", "netns", "exec", h["head"], "curl", "-sf", url, "-H",
                      "Content-Type: application/json", "-d", body, check=False)
        assert answer.returncode == 0 and json.loads(answer.stdout)["choices"][0]["message"]["content"]
        # The worker really runs on the second host: it advertises that host's address.
        health = json.loads(_run("ip", "netns", "exec", h["head"], "curl", "-sf",
                                 f"http://{h['head_ip']}:8000/health").stdout)
        assert [i["address"].split(":")[0] for i in health["instances"]] == [h["node_ip"]]
    finally:
        stopped = cluster("stop")
    assert stopped.returncode == 0, stopped.stderr
    after = cluster("status")
    assert after.returncode != 0 and "no cluster recorded" in after.stderr
    # Nothing is left on either host.
    left = _run("pgrep", "-f", f"dynamo_lite.mocker.*{h['node_ip']}", check=False)
    assert left.stdout.strip() == "", left.stdout


def _kill_leftovers(subnet: str) -> None:
    """Processes of this test that a failed start left behind: their command lines name its own subnet."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"{subnet}." in cmdline and "dynamo_lite" in cmdline and proc.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _logs(state, h) -> str:
    out = []
    for path in sorted(state.glob("*.log")) if state.exists() else []:
        out.append(f"--- {path.name}\n{path.read_text()[-1500:]}")
    remote = REPO / "runs" / "cluster" / "worker0.log"
    if remote.exists():
        out.append(f"--- worker0 on {h['node_ip']}\n{remote.read_text()[-1500:]}")
    return "\n".join(out)
