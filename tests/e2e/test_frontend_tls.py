"""The frontend over HTTPS (--tls-cert-file / --tls-key-file, and their environment twins), with a certificate
made by the test: a client that trusts the CA is served, plain HTTP is not, and a key that does not match
the certificate stops the frontend at once with one clear line. `serve` started with them waits for its
frontend over HTTPS, prints an https:// URL and asks its question over it."""

from __future__ import annotations

import ssl
import subprocess

import httpx
import pytest

from tests.e2e.harness import REPO, wait_until
from tests.e2e.test_launch_scripts import gone, started_pids
from tests.e2e.test_serve import serve, serve_env
from tests.services import free_tcp_port
from tests.tls_material import make_tls_files

__all__ = ["serve_env"]  # the fixture, shared


def test_https_with_a_certificate_made_here_and_a_clear_error_for_a_wrong_key(embedded_group, tmp_path):
    group = embedded_group
    tls = make_tls_files(tmp_path / "tls")
    port = free_tcp_port()
    frontend = group.start("frontend", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                           str(port), "--tls-cert-file", str(tls.server_cert), "--tls-key-file",
                           str(tls.server_key), "--api-key", "k1")
    trusted = ssl.create_default_context(cafile=str(tls.ca))

    def live() -> bool:
        try:
            return httpx.get(f"https://127.0.0.1:{port}/live", verify=trusted, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(live, 30, "the frontend on https", [frontend])
    models = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=trusted, timeout=5,
                       headers={"Authorization": "Bearer k1"})
    assert models.status_code == 200, models.text  # the API key works over TLS as before
    with pytest.raises(httpx.ConnectError):  # an unknown CA is refused by a client that verifies
        httpx.get(f"https://127.0.0.1:{port}/live", timeout=2)
    with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port gets no answer
        httpx.get(f"http://127.0.0.1:{port}/live", timeout=2)
    assert "serving HTTPS on 127.0.0.1" in frontend.log_tail()

    wrong = group.start("wrong-key", "dynamo_lite.frontend", "--http-host", "127.0.0.1", "--http-port",
                        str(free_tcp_port()),
                        extra_env={"DYN_TLS_CERT_FILE": str(tls.server_cert),  # the environment twins
                                   "DYN_TLS_KEY_FILE": str(tls.client_key)})
    wait_until(lambda: not wrong.alive(), 20, "the frontend with a wrong key to exit")
    assert wrong.returncode == 1
    tail = wrong.log_tail()
    assert "cannot serve HTTPS with --tls-cert-file" in tail and "Traceback" not in tail, tail


@pytest.mark.parametrize("given", ["flags", "environment"])
def test_serve_with_tls_waits_for_its_frontend_over_https_and_asks_over_it(serve_env, tmp_path, given):
    """The launcher's health checks and --ask verify the frontend against the certificate it serves (issued
    by a CA the launcher is not told about): over plain http:// they would never see it come up."""
    tls = make_tls_files(tmp_path / "tls")
    port = free_tcp_port()
    args = ["--engine", "mocker", "--ask", "What is the capital of France?", "--once", "--port", str(port)]
    if given == "flags":
        args += ["--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key)]
    else:
        serve_env.update(DYN_TLS_CERT_FILE=str(tls.server_cert), DYN_TLS_KEY_FILE=str(tls.server_key))
    result = subprocess.run(serve(*args), env=serve_env, cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert f"at https://127.0.0.1:{port}/v1" in result.stdout
    assert "Q: What is the capital of France?\nA: " in result.stdout
    assert all(gone(pid) for pid in started_pids(tmp_path / "run").values())
