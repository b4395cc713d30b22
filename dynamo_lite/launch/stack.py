"""The pieces of a local stack: etcd, NATS, the frontend and workers, each started under the
supervisor and waited for with a bound. The topologies (topologies.py) put them together."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynamo_lite.launch.settings import DEFAULT_MODEL_PATH, LaunchSettings, etcd_arch_env
from dynamo_lite.launch.supervisor import (LaunchError, Process, Supervisor, http_get, http_ok,
                                           port_open)
from dynamo_lite.runtime.net import free_tcp_port
from dynamo_lite.serve.side_ports import check_room, pop_side_port, side_port_args

INFRA_START_TIMEOUT = 30.0
FRONTEND_START_TIMEOUT = 60.0
# The frontend's HTTPS certificate option and its environment twin (frontend/config.py).
TLS_CERT_FLAG, TLS_CERT_ENV = "--tls-cert-file", "DYN_TLS_CERT_FILE"


@dataclass(frozen=True)
class Engine:
    """How one engine's worker is started: its module, how it is given the model, its role flags."""

    module: str
    model_flag: str
    length_flag: str
    role_flags: dict[str, tuple[str, ...]]
    has_eager: bool


ENGINES = {
    "vllm": Engine("dynamo_lite.vllm", "--model", "--max-model-len",
                   {"agg": (), "prefill": ("--is-prefill-worker", "--connector", "nixl"),
                    "decode": ("--connector", "nixl")}, has_eager=True),
    # The mocker simulates the engine (no vLLM, no NIXL): topologies start in seconds.
    "mocker": Engine("dynamo_lite.mocker", "--model-path", "--context-length",
                     {"agg": (), "prefill": ("--is-prefill-worker",), "decode": ("--is-decode-worker",)},
                     has_eager=False),
}


def is_nats(host: str, port: int) -> bool:
    """A NATS server greets every connection with "INFO {...}"."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(2)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


def frontend_tls_cert(argv: Sequence[str], env: Mapping[str, str]) -> str:
    """The certificate file the frontend started with `argv` and `env` serves HTTPS with ("" = plain
    HTTP): its last --tls-cert-file, as argparse takes it, else its environment twin."""
    cert = env.get(TLS_CERT_ENV, "")
    for i, arg in enumerate(argv):
        if arg == TLS_CERT_FLAG and i + 1 < len(argv):
            cert = argv[i + 1]
        elif arg.startswith(TLS_CERT_FLAG + "="):
            cert = arg.split("=", 1)[1]
    return cert


def pinned_context(cert_file: str) -> ssl.SSLContext:
    """A client context that trusts exactly the certificates in `cert_file` (the frontend's own, whoever
    issued it) and not its host name: the launcher reaches the frontend it started on loopback or on
    HTTP_HOST, which a certificate made for the public name need not carry."""
    context = ssl.create_default_context(cafile=cert_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the trust anchor
    context.check_hostname = False
    return context


def check_model(settings: LaunchSettings) -> None:
    """Fail early (before starting anything) if MODEL_PATH is not a model folder."""
    if (Path(settings.model_path) / "config.json").is_file():
        return
    if settings.model_path == DEFAULT_MODEL_PATH:
        raise LaunchError(f"the default model folder {settings.model_path} is missing: run 'bash scripts/setup.sh'")
    raise LaunchError(f"MODEL_PATH={settings.model_path} is not a model folder (no config.json); "
                      "nothing is downloaded here")


class Stack:
    """One run's processes and the addresses they were given."""

    def __init__(self, settings: LaunchSettings, supervisor: Supervisor, engine: Engine):
        self.settings = settings
        self.sup = supervisor
        self.engine = engine
        self.say = supervisor.say
        self.http_port: int | None = None
        self.workers_started = 0  # the next worker's side port is the given one + this (serve/side_ports.py)
        self.tls_cert = ""  # the frontend's HTTPS certificate, once started with one
        self.client_context: ssl.SSLContext | None = None  # what this launcher verifies it with

    @property
    def url(self) -> str:
        """Where this host reaches the frontend: HTTP_HOST when it names one address, else loopback;
        https:// when the frontend serves TLS."""
        host = self.settings.http_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        scheme = "https" if self.tls_cert else "http"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.http_port}"

    def _export(self, name: str, value: str) -> None:
        """What the scripts exported: every process started after this sees it."""
        self.sup.env[name] = value

    # --- etcd / NATS -------------------------------------------------------------------------------------

    def start_etcd(self) -> None:
        """Unless ETCD_ENDPOINTS is set, reuse an etcd already on ETCD_PORT or start one with its data
        dir in the run dir. Exports ETCD_ENDPOINTS (the components read it as their --etcd-endpoints twin)."""
        s = self.settings
        if s.etcd_endpoints:
            self.say(f"etcd: using ETCD_ENDPOINTS={s.etcd_endpoints}")
            self._export("ETCD_ENDPOINTS", s.etcd_endpoints)
            return
        port, probe = s.etcd_port, s.probe_host
        url = f"http://{probe}:{port}"
        if port_open(probe, port):
            if not http_ok(f"{url}/health"):
                raise LaunchError(f"port {port} is in use but is not a healthy etcd: free it or set "
                                  "ETCD_PORT / ETCD_ENDPOINTS")
            self._export("ETCD_ENDPOINTS", url)
            self.say(f"etcd: reusing the one already listening on {url}")
            return
        etcd = shutil.which("etcd")
        if etcd is None:
            raise LaunchError("etcd not found: run scripts/setup.sh (apt package etcd-server)")
        peer = f"http://127.0.0.1:{free_tcp_port()}"
        proc = self.sup.start("etcd", [
            etcd, "--name", "dynamo-lite", "--data-dir", str(self.sup.run_dir / "etcd"),
            "--listen-client-urls", f"http://{s.infra_host}:{port}",
            "--advertise-client-urls", f"http://{s.advertise_host}:{port}",
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"dynamo-lite={peer}"], env=etcd_arch_env())
        self.sup.wait_until(lambda: http_ok(f"{url}/health"), INFRA_START_TIMEOUT, f"etcd on {url}", [proc])
        self._export("ETCD_ENDPOINTS", url)
        self.say(f"etcd: ready at {url}")

    def start_nats(self) -> None:
        """Unless NATS_SERVER is set, reuse a NATS already on NATS_PORT or start one (JetStream on, store
        in the run dir). Exports NATS_SERVER."""
        s = self.settings
        if s.nats_server:
            self.say(f"nats: using NATS_SERVER={s.nats_server}")
            self._export("NATS_SERVER", s.nats_server)
            return
        port, probe = s.nats_port, s.probe_host
        url = f"nats://{probe}:{port}"
        if port_open(probe, port):
            if not is_nats(probe, port):
                raise LaunchError(f"port {port} is in use but is not a NATS server: free it or set "
                                  "NATS_PORT / NATS_SERVER")
            self._export("NATS_SERVER", url)
            self.say(f"nats: reusing the one already listening on {url}")
            return
        nats = shutil.which("nats-server")
        if nats is None:
            raise LaunchError("nats-server not found: run scripts/setup.sh")
        # The monitoring port is optional: take another one if something already has it.
        monitor = s.nats_monitor_port
        if port_open("127.0.0.1", monitor):
            monitor = free_tcp_port()
        proc = self.sup.start("nats", [nats, "-js", "-a", s.infra_host, "-p", str(port), "-m", str(monitor),
                                       "-sd", str(self.sup.run_dir / "nats")])
        self.sup.wait_until(lambda: port_open(probe, port), INFRA_START_TIMEOUT, f"nats-server on {url}", [proc])
        self._export("NATS_SERVER", url)
        self.say(f"nats: ready at {url} (monitoring http://{probe}:{monitor})")

    # --- frontend ----------------------------------------------------------------------------------------

    def pick_http_port(self, flag: str = "HTTP_PORT") -> None:
        """Keep HTTP_PORT if given (fail if busy); else 8000, or a free port if 8000 is busy. `flag` is how
        the caller's user sets the port (messages name it)."""
        port = self.settings.http_port
        if port is not None:
            if port_open("127.0.0.1", port):
                raise LaunchError(f"{flag}={port} is already in use: choose another ({flag}={port + 1} ...)")
        elif port_open("127.0.0.1", 8000):
            port = free_tcp_port()
            self.say(f"port 8000 is in use: the frontend takes {port} instead (set {flag} to choose)")
        else:
            port = 8000
        self.http_port = port
        self._export("HTTP_PORT", str(port))

    def start_frontend(self, *args: str) -> Process:
        """The OpenAI frontend on HTTP_PORT (pick_http_port first), waited for on /live: it answers as
        soon as HTTP is up (/health stays 503 until a worker serves a model)."""
        s = self.settings
        argv = [s.python, "-m", "dynamo_lite.frontend", "--http-port", str(self.http_port)]
        if s.http_host:
            argv += ["--http-host", s.http_host]
        argv = [*argv, *s.frontend_args, *args]
        self.tls_cert = frontend_tls_cert(argv, self.sup.env)
        if self.tls_cert:
            try:
                self.client_context = pinned_context(self.tls_cert)
            except (OSError, ssl.SSLError) as e:
                raise LaunchError(f"cannot read the frontend's certificate {self.tls_cert} "
                                  f"({TLS_CERT_FLAG} / {TLS_CERT_ENV}): {e}") from e
        proc = self.sup.start("frontend", argv)
        self.sup.wait_until(lambda: http_ok(f"{self.url}/live", context=self.client_context),
                            FRONTEND_START_TIMEOUT, f"the frontend on {self.url}/live", [proc])
        self.say(f"frontend: ready at {self.url}")
        return proc

    # --- workers -----------------------------------------------------------------------------------------

    def start_worker(self, name: str, omp_bind: str | None, role: str, extra: Sequence[str] = (), *,
                     env: Mapping[str, str] | None = None, cpus: Iterable[int] | None = None) -> Process:
        """One worker of `role` (agg, prefill, decode), its OpenMP threads pinned to `omp_bind` (None: not
        pinned, e.g. a GPU engine): two CPU engines on one small box starve each other unpinned. `env` is
        added to its environment, `cpus` pins the whole process. An empty MAX_MODEL_LEN leaves the length
        to the engine. Returns at once; wait with wait_health()."""
        s, e = self.settings, self.engine
        check_model(s)
        argv = [s.python, "-m", e.module, e.model_flag, s.model_path,
                "--served-model-name", s.served_model_name]
        if s.max_model_len:
            argv += [e.length_flag, s.max_model_len]
        if e.has_eager and s.enforce_eager == "1":
            argv.append("--enforce-eager")
        elif e.has_eager and s.enforce_eager == "0":
            argv.append("--no-enforce-eager")
        env = {**(env or {})}
        if omp_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
        # The worker registers ADVERTISE_HOST as its address (and vLLM's NIXL side-channel host), unless
        # it joins a remote etcd without one given: then it detects the address that reaches etcd.
        if s.worker_advertise_host:
            env["DYN_ADVERTISE_HOST"] = s.worker_advertise_host
        elif not s.worker_detects_address:
            env["DYN_ADVERTISE_HOST"] = s.advertise_host
        # Each worker on this host gets its own side port: the one given (WORKER_ARGS, extra or
        # DYN_METRICS_ENDPOINT_PORT) for the first, the next for each one after.
        try:
            side_port, _ = pop_side_port([*s.worker_args, *extra], {**self.sup.env, **env})
            check_room(side_port or 0, self.workers_started + 1)
        except ValueError as error:
            raise LaunchError(str(error)) from None
        worker_args, extra = pop_side_port(s.worker_args, {})[1], pop_side_port(extra, {})[1]
        side_port_flag = side_port_args(side_port, self.workers_started)
        self.workers_started += 1
        return self.sup.start(name, [*argv, *worker_args, *e.role_flags[role], *extra, *side_port_flag],
                              env=env, cpus=cpus)

    def health(self) -> dict:
        """The frontend's /health body ({} while it answers nothing or not 200: no model served yet)."""
        status, body = http_get(f"{self.url}/health", context=self.client_context)
        return json.loads(body) if status == 200 else {}

    def served_instances(self, role: str | None = None) -> list[dict]:
        """Instances of SERVED_MODEL_NAME on /health (of `role`, when given)."""
        return [i for i in self.health().get("instances", [])
                if i.get("model") == self.settings.served_model_name and (role is None or i.get("role") == role)]

    def wait_health(self, counts: dict[str | None, int], timeout: float) -> None:
        """Wait until /health lists at least counts[role] instances of SERVED_MODEL_NAME for each role
        (None: any role): what a user waits for. Fail early, with its log, if a process dies."""
        def enough() -> bool:
            return all(len(self.served_instances(role)) >= n for role, n in counts.items())

        wanted = " + ".join(f"{n} {f'{role} ' if role else ''}worker(s)" for role, n in counts.items())
        self.sup.wait_until(enough, timeout, f"{wanted} of {self.settings.served_model_name} on {self.url}/health")

    def show_logs(self, *names: str) -> None:
        """Print the last lines of the named processes' logs (for a failure that is no process's exit)."""
        for proc in self.sup.procs:
            if proc.name in names:
                tail = "\n".join(f"    {line}" for line in proc.log_tail().splitlines())
                self.say(f"last lines of {proc.log_path}:\n{tail}")
