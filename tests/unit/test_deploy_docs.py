"""docs/kubernetes.md, container/README.md and docs/compatibility.md against the files they describe: every
command they show names overlays, objects and script options that exist (the scripts' commands are run
with --dry-run), and every figure they state (ports, grace periods, replicas, resources, images, UCX
settings, pinned releases) is the one the rendered manifests and pyproject.toml hold."""

from __future__ import annotations

import functools
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from dynamo_lite.protocol.errors import ConfigError
from dynamo_lite.vllm import compat
from tests.k8s_render import render
from tests.unit.test_deploy_k8s import KUBERNETES_VERSION, OVERLAYS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_MD = (ROOT / "docs" / "kubernetes.md").read_text()
CONTAINER_MD = (ROOT / "container" / "README.md").read_text()
COMPATIBILITY_MD = (ROOT / "docs" / "compatibility.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def code_lines(markdown: str) -> list[str]:
    """Shell lines of the ```bash blocks and `inline` spans starting with container/, joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`(container/[^`]+)`", markdown)
    return [line.split(" #")[0].strip() for line in lines if line.strip()]


@functools.cache
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def objects_named(kind: str) -> set[str]:
    return {o["metadata"]["name"] for objects in rendered().values() for o in objects if o["kind"] == kind}


def one(name: str, overlay: str = "disaggregated") -> dict:
    [obj] = [o for o in rendered()[overlay]
             if o["metadata"]["name"] == name and o["kind"] not in ("PodDisruptionBudget", "Service")]
    return obj


def container(name: str, overlay: str = "disaggregated") -> dict:
    return one(name, overlay)["spec"]["template"]["spec"]["containers"][0]


def env_of(name: str, overlay: str = "disaggregated") -> dict[str, str]:
    [cm] = [o for o in rendered()[overlay] if o["kind"] == "ConfigMap"]
    env = dict(cm["data"])
    env.update({e["name"]: e.get("value") for e in container(name, overlay).get("env", [])})
    return env


def test_kubectl_commands_name_overlays_and_objects_that_exist():
    kubectl = [line for line in code_lines(KUBERNETES_MD) if line.startswith("kubectl")]
    assert kubectl
    kinds = {"deployment": objects_named("Deployment"), "service": objects_named("Service")}
    for line in kubectl:
        for path in re.findall(r"-k (\S+)", line):
            assert (ROOT / path / "kustomization.yaml").is_file(), line
            assert Path(path).name in OVERLAYS, line
        for kind, name in re.findall(r"\b(deployment|service)/([a-z0-9-]+)", line):
            assert name in kinds[kind], f"{line}: no {kind} {name}"
        if " -n " in line or line.startswith("kubectl -n"):
            assert "-n dynamo-lite" in line, line
    assert "kubectl create namespace dynamo-lite" in kubectl


def test_files_the_kubernetes_page_names_exist():
    for path in re.findall(r"`((?:deploy/k8s/|overlays/)[\w./-]+)`", KUBERNETES_MD):
        full = ROOT / path if path.startswith("deploy/") else K8S / path
        assert full.exists(), path
    for name in re.findall(r"`([\w-]+\.yaml)`", KUBERNETES_MD):
        assert list(K8S.rglob(name)), name


@pytest.mark.parametrize("markdown", [KUBERNETES_MD, CONTAINER_MD],
                         ids=["kubernetes.md", "container/README.md"])
def test_container_script_commands_in_the_docs_run_as_written(markdown):
    commands = [line for line in code_lines(markdown) if re.search(r"(^|\s)container/(build|run)\.sh", line)]
    assert commands
    for line in commands:
        words = line.split()
        at = next(i for i, w in enumerate(words) if w.startswith("container/"))
        env = dict(w.split("=", 1) for w in words[:at])
        argv = ["bash", words[at], "--dry-run", *words[at + 1:]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False,
                                env={"PATH": "/usr/bin:/bin", **env})
        assert result.returncode == 0, f"{line}: {result.stderr}"
        assert result.stdout.startswith("docker "), line


def test_the_overlay_table_lists_every_overlay_with_its_image():
    table = dict(re.findall(r"^\| `([\w-]+)` \|.*\| (`[^|]*`) \|$", KUBERNETES_MD, re.MULTILINE))
    assert set(table) == set(OVERLAYS)
    for name, objects in rendered().items():
        [tag] = {c["image"].rsplit("-", 1)[1] for o in objects if o["kind"] == "Deployment"
                 for c in o["spec"]["template"]["spec"]["containers"]}
        assert table[name].strip("`").endswith("-" + tag), name
    workers = {name: one("dynamo-lite-worker", name)["spec"]["replicas"] for name in OVERLAYS}
    assert workers["aggregated"] == 1 and "1 GPU worker" in KUBERNETES_MD
    assert workers["kv-routed"] == 2 and "`--router-mode kv`, 2 workers" in KUBERNETES_MD


def test_figures_on_the_kubernetes_page_are_the_manifests():
    worker, frontend = one("dynamo-lite-worker"), one("dynamo-lite-frontend")
    env = env_of("dynamo-lite-worker")
    doc = " ".join(KUBERNETES_MD.split())  # lines joined: figures may wrap
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = env["DYN_DRAIN_TIMEOUT"]
    assert f"`terminationGracePeriodSeconds: {grace}` is above the {drain} s `DYN_DRAIN_TIMEOUT`" in doc
    assert f"(`DYN_METRICS_ENDPOINT_PORT={env['DYN_METRICS_ENDPOINT_PORT']}`)" in doc
    assert f"The request plane is on {env['DYN_REQUEST_PLANE_PORT']}," in doc
    assert f"NIXL's handshake on {env['DYN_NIXL_SIDE_CHANNEL_PORT']} (`DYN_NIXL_SIDE_CHANNEL_PORT`)" in doc
    assert f"`UCX_TLS={env['UCX_TLS']}` and `UCX_NET_DEVICES={env['UCX_NET_DEVICES']}`" in doc
    assert "IPC_LOCK" in container("dynamo-lite-worker")["securityContext"]["capabilities"]["add"]
    front_grace = frontend["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"**Frontends** ({frontend['spec']['replicas']} replicas, port 8000)" in doc
    assert f"{front_grace} s grace" in doc
    assert worker["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert frontend["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "(`maxSurge: 0, maxUnavailable: 1`" in doc and "(`maxUnavailable: 0`)" in doc
    shm = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}["shm"]["emptyDir"]
    assert shm["sizeLimit"] == "8Gi" and "`/dev/shm` is an 8 GiB memory volume" in doc

    def span(res: dict, kind: str) -> str:
        low, high = res["requests"][kind], res["limits"][kind]
        return f"{low.removesuffix('Gi')}–{high.removesuffix('Gi')}"

    w, f = container("dynamo-lite-worker")["resources"], container("dynamo-lite-frontend")["resources"]
    assert (f"worker: {span(w, 'cpu')} CPUs, {span(w, 'memory')} GiB; "
            f"frontend {span(f, 'cpu')} CPUs, {span(f, 'memory')} GiB") in doc
    spark = container("dynamo-lite-worker", "dgx-spark")["resources"]
    assert f"the Spark overlay sets {span(spark, 'memory')} GiB" in doc
    assert f"({spark['limits']['memory'].removesuffix('Gi')} GiB)" in doc
    for plane, size in (("dynamo-lite-etcd", "2Gi"), ("dynamo-lite-nats", "5Gi")):
        stateful = one(plane)
        image = stateful["spec"]["template"]["spec"]["containers"][0]["image"]
        assert f"`{image}`" in doc
        [claim] = stateful["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
    assert "2 GiB and 5 GiB volumes" in doc
    selector = one("dynamo-lite-worker", "dgx-spark")["spec"]["template"]["spec"]["nodeSelector"]
    [(label, value)] = [(k, v) for k, v in selector.items() if k != "kubernetes.io/arch"]
    assert f"kubectl label node SPARK_NODE {label}={value}" in doc
    assert f"**Kubernetes {KUBERNETES_VERSION.rsplit('.', 1)[0]}** schemas" in doc
    validate = next(d for d in PYPROJECT["project"]["optional-dependencies"]["test"]
                    if d.startswith("kubernetes-validate=="))
    assert f"`kubernetes-validate` {validate.split('==')[1].rsplit('.', 1)[0]}" in doc


def test_the_kubernetes_page_has_the_sections_the_issue_asks_for():
    headings = re.findall(r"^## (.+)$", KUBERNETES_MD, re.MULTILINE)
    assert headings == ["Install", "Scale the prefill and decode pools", "DGX Spark nodes", "Upgrade"]


def test_compatibility_page_states_the_pins_and_the_range_the_code_uses():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for pin in extras["cpu"] + extras["cpu-nodeps"] + extras["gpu"] + extras["gpu-nodeps"]:
        assert f"`{pin}`" in COMPATIBILITY_MD, pin
    low, end = (".".join(map(str, v)) for v in (compat.MIN_VERSION, compat.END_VERSION))
    assert f"`>= {low}, < {end}`" in COMPATIBILITY_MD
    # The refusal the page shows is the one the worker gives.
    shown = re.search(r"python -m dynamo_lite\.vllm: error: (vLLM .*)$", COMPATIBILITY_MD,
                      re.MULTILINE).group(1)
    with pytest.raises(ConfigError) as refused:
        compat.check_vllm_version(shown.split()[1])
    assert refused.value.message == shown
    # Where each combination ran: CI for the cpu extra, the H200 run for gpu, nowhere for DGX Spark.
    rows = {row.split("|")[1].strip(): row for row in COMPATIBILITY_MD.splitlines() if row.startswith("| `")}
    assert "CI, every commit" in rows["`cpu`"]
    assert "H200" in rows["`gpu`"] and "not in CI" in rows["`gpu`"]
    assert "**nowhere**" in rows["`gpu` on DGX Spark"]


def test_container_readme_says_nothing_was_built():
    assert "**No image has been built or run.**" in CONTAINER_MD
    assert "What nobody has checked:" in CONTAINER_MD
    assert "None has\nbeen built." in COMPATIBILITY_MD or "None has been built." in COMPATIBILITY_MD
