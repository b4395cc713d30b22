"""container/ and deploy/docker-compose.yml, without a Docker engine: hadolint on the Dockerfile, what the
image promises (non-root, health check, pinned bases, .dockerignore), the docker commands build.sh and
run.sh make for each target, and the compose file against the Compose specification's JSON schema
(bundled in check-jsonschema) plus what its services must keep (profiles, drain, side port)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_lite.engine.config import WorkerShellConfig

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "container" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
BIN = Path(sys.executable).parent  # hadolint and check-jsonschema come with the test extra
DRAIN = WorkerShellConfig.__dataclass_fields__["drain_timeout"].default


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return run(str(BIN / "hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(path), check=False)


def check_compose(path: Path) -> subprocess.CompletedProcess:
    schema = "vendor.compose-spec"  # the Compose specification's schema, as check-jsonschema 0.39 bundles it
    return run(str(BIN / "check-jsonschema"), "--builtin-schema", schema, str(path), check=False)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, check=check)


def test_hadolint_passes_the_dockerfile():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_dockerfile_with_what_ours_avoids(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\nCMD bash\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert {"DL3007", "DL3003", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_the_image_runs_unprivileged_with_a_health_check_and_pinned_bases():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] == "1000:1000"  # the manifests' runAsUser
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/live", text, re.MULTILINE)
    [base] = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.MULTILINE)
    build = (ROOT / "container" / "build.sh").read_text()
    bases = [base, *re.findall(r'^(?:CPU|CUDA)_BASE="(\S+)"', build, re.MULTILINE)]
    assert len(bases) == 3
    for image in bases:
        _, _, tag = image.partition(":")
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image} is not pinned to an exact release"
    assert "--drain-timeout" in text and "STOPSIGNAL SIGTERM" in text


def test_dockerignore_keeps_the_repository_noise_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", "**/__pycache__", ".pytest_cache"} <= ignored


@pytest.mark.parametrize("args, platform, base, extra, index, tag", [
    (["--platform", "linux/amd64"], "linux/amd64", "python:", "cpu", "https://download.pytorch.org/whl/cpu",
     "cpu"),
    (["--platform", "linux/amd64", "--cuda"], "linux/amd64", "nvidia/cuda:13.", "gpu", "", "cuda"),
    (["--platform", "linux/arm64", "--dgx-spark"], "linux/arm64", "nvidia/cuda:13.", "gpu", "", "spark"),
])
def test_build_sh_makes_each_target(args, platform, base, extra, index, tag):
    out = run("bash", "container/build.sh", *args, "--dry-run").stdout
    assert f"--platform {platform} " in out
    assert f"BASE_IMAGE={base}" in out and f"ENGINE_EXTRA={extra} " in out
    assert re.search(rf"PIP_EXTRA_INDEX_URL={re.escape(index)}(\s|'')", out)  # never CPU torch on a GPU
    assert re.search(rf"-t dynamo-lite:\d+\.\d+\.\d+-{tag} ", out)


def test_build_sh_refuses_a_dgx_spark_image_for_amd64():
    result = run("bash", "container/build.sh", "--platform", "linux/amd64", "--dgx-spark", "--dry-run",
                 check=False)
    assert result.returncode == 2 and "linux/arm64" in result.stderr


def test_run_sh_gives_workers_their_side_port_and_a_stop_timeout_above_the_drain():
    out = run("bash", "container/run.sh", "--worker", "--gpus", "--dry-run").stdout
    assert "-e DYN_METRICS_ENDPOINT_PORT=9090 -e HEALTHCHECK_PORT=9090" in out and "--gpus all" in out
    assert out.rstrip().endswith("python -m dynamo_lite.vllm")
    assert int(re.search(r"--stop-timeout (\d+)", out).group(1)) > DRAIN + 30
    default = run("bash", "container/run.sh", "--dry-run").stdout
    assert "-p 8000:8000" in default and "--gpus" not in default


def test_compose_file_passes_the_compose_specification_schema(tmp_path):
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "compose.yml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period: 60s", "stop_grace_perod: 60s"))
    result = check_compose(bad)
    assert result.returncode == 1 and "stop_grace_perod" in result.stdout


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)s", value)
    assert match, value
    return float(match.group(1))


def test_compose_services_by_profile():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "profiles" not in services["etcd"] and "profiles" not in services["nats"]
    assert services["frontend"]["profiles"] == ["cpu", "gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"] and services["worker-gpu"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["image"].endswith("-cpu")
    assert services["worker-gpu"]["image"].endswith("-cuda")
    [device] = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] >= 1
    for name in ("worker-cpu", "worker-gpu"):
        service = services[name]
        env = service["environment"]
        assert env["DYN_METRICS_ENDPOINT_PORT"] == env["HEALTHCHECK_PORT"] == "9090"
        assert _seconds(service["stop_grace_period"]) > float(env["DYN_DRAIN_TIMEOUT"]) + 30
        assert env["ETCD_ENDPOINTS"] == "http://etcd:2379" and env["NATS_SERVER"] == "nats://nats:4222"
        assert set(service["depends_on"]) == {"etcd", "nats"}


@pytest.mark.parametrize("script, first_line", [
    ("build.sh", "Build the dynamo_lite image for one target"),
    ("run.sh", "Run the dynamo_lite image"),
])
def test_both_scripts_share_help_errors_and_value_options(script, first_line):
    """container/common.sh: --help is the header comment, bad arguments exit 2 naming the script, and an
    option's value comes as `--opt VALUE` or `--opt=VALUE`."""
    help_text = run("bash", f"container/{script}", "--help").stdout
    assert help_text.startswith(first_line) and "--dry-run" in help_text and "set -euo" not in help_text
    bad = run("bash", f"container/{script}", "--bogus", check=False)
    assert bad.returncode == 2
    assert bad.stderr == f"container/{script}: error: unknown argument --bogus (see --help)\n"
    option = "--tag" if script == "build.sh" else "--image"
    missing = run("bash", f"container/{script}", option, check=False)
    assert missing.returncode == 2 and f"{option} needs a value" in missing.stderr
    spaced = run("bash", f"container/{script}", option, "x:1", "--dry-run").stdout
    joined = run("bash", f"container/{script}", f"{option}=x:1", "--dry-run").stdout
    assert " x:1 " in spaced and spaced.split("--name")[0] == joined.split("--name")[0]
