"""deploy/k8s: every overlay rendered (tests/k8s_render.py), validated against the Kubernetes schemas of
one pinned release (kubernetes-validate, schemas bundled, strict: unknown fields fail), and checked for
what an operator relies on: probes on the workers' side port, a grace period longer than the drain,
disruption budgets, resource limits, GPUs, node selectors, NIXL/UCX settings, and flags and
environment variables the processes really read."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dynamo_lite.frontend.__main__ import GRACEFUL_TIMEOUT
from dynamo_lite.frontend.config import FrontendConfig
from dynamo_lite.runtime.config import env_name, flag_name, is_option
from dynamo_lite.vllm.args import VllmWorkerConfig
from tests.k8s_render import RenderError, render, strategic_merge

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the release whose schemas the manifests must pass (docs/kubernetes.md)
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
GPU_TAG = {"aggregated": "cuda", "kv-routed": "cuda", "disaggregated": "cuda", "external-planes": "cuda",
           "dgx-spark": "spark"}
KV_ROUTED = {"kv-routed", "disaggregated", "dgx-spark", "external-planes"}
DISAGGREGATED = {"disaggregated", "dgx-spark"}
# Read by the processes but not options: the etcd / NATS twins, the model folder default
# (runtime.models) and the served name the manifests expand into --served-model-name.
OTHER_ENV = {"ETCD_ENDPOINTS", "NATS_SERVER", "DYN_MODEL_PATH", "SERVED_MODEL_NAME"}
VLLM_FLAGS = {"--served-model-name"}  # vLLM's own flags the manifests pass


def _options(config_class) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if is_option(f)]


WORKER_FLAGS = {flag_name(f) for f in _options(VllmWorkerConfig)} | VLLM_FLAGS
FRONTEND_FLAGS = {flag_name(f) for f in _options(FrontendConfig)}
KNOWN_ENV = {env_name(f) for f in _options(VllmWorkerConfig) + _options(FrontendConfig)} | OTHER_ENV


@pytest.fixture(scope="module", params=OVERLAYS)
def variant(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


def workloads(objects):
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def ours(objects):
    """Deployments running dynamo_lite, with their (only) container."""
    for obj in objects:
        if obj["kind"] == "Deployment":
            [container] = obj["spec"]["template"]["spec"]["containers"]
            yield obj, container


def config_map(objects) -> dict[str, str]:
    [cm] = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "dynamo-lite-config"]
    return cm["data"]


def environment(objects, container) -> dict[str, str]:
    env = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "dynamo-lite-config"
        env.update(config_map(objects))
    env.update({e["name"]: e.get("value", "<from field>") for e in container.get("env", [])})
    return env


def quantity(value) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match, value
    return float(match.group(1)) * units.get(match.group(2), 1)


def test_overlays_exist():
    assert set(OVERLAYS) == set(GPU_TAG)


def test_every_object_passes_the_kubernetes_schemas(variant):
    _, objects = variant
    for obj in objects:
        # Raises ValidationError naming the field (strict: an unknown or misspelt field fails too).
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_resources_security_and_pinned_images(variant):
    name, objects = variant
    for obj in workloads(objects):
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
        for container in pod["containers"]:
            where = f"{name}/{obj['metadata']['name']}/{container['name']}"
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                assert quantity(resources["requests"][kind]) <= quantity(resources["limits"][kind]), where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            image, _, tag = container["image"].rpartition(":")
            assert image and tag and tag != "latest", where
            if image.endswith("dynamo-lite"):
                assert tag.endswith("-" + GPU_TAG[name]), where


def test_workers_probe_the_side_port_and_outlive_their_drain(variant):
    name, objects = variant
    workers = [(o, c) for o, c in ours(objects) if "dynamo_lite.vllm" in c["command"]]
    assert workers
    for obj, container in workers:
        where = f"{name}/{obj['metadata']['name']}"
        env = environment(objects, container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(env["DYN_METRICS_ENDPOINT_PORT"]) > 0, where
        assert ports["request-plane"] == int(env["DYN_REQUEST_PLANE_PORT"]), where
        probes = {kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
                  for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert probes == {"startupProbe": ("/live", "metrics"), "livenessProbe": ("/live", "metrics"),
                          "readinessProbe": ("/ready", "metrics")}, where
        pod = obj["spec"]["template"]["spec"]
        drain = float(env["DYN_DRAIN_TIMEOUT"])
        # Drain, then up to 5 s revoking the lease and the engine's own shutdown: SIGKILL comes later.
        assert pod["terminationGracePeriodSeconds"] >= drain + 30, where
        template = obj["spec"]["template"]["metadata"]["annotations"]
        assert template["prometheus.io/port"] == str(ports["metrics"]), where
        [advertise] = [e for e in container["env"] if e["name"] == "DYN_ADVERTISE_HOST"]
        assert advertise["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", where
        resources = container["resources"]
        assert quantity(resources["limits"]["nvidia.com/gpu"]) >= 1, where
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], where
        assert {"mountPath": "/dev/shm", "name": "shm"} in container["volumeMounts"], where


def test_frontend_probes_service_and_grace(variant):
    name, objects = variant
    [(obj, container)] = [(o, c) for o, c in ours(objects) if "dynamo_lite.frontend" in c["command"]]
    assert obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > GRACEFUL_TIMEOUT
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "http"}
    args = container["args"]
    assert args[args.index("--router-mode") + 1] == ("kv" if name in KV_ROUTED else "round-robin")


def test_every_pool_has_a_disruption_budget_and_services_find_their_pods(variant):
    name, objects = variant
    pods = {o["metadata"]["name"]: o["spec"]["template"] for o in workloads(objects)}
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for deployment, container in ours(objects):
        labels = pods[deployment["metadata"]["name"]]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}/{deployment['metadata']['name']}: {len(covering)} budgets"
        assert covering[0]["spec"]["maxUnavailable"] == 1
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        selected = [t for t in pods.values() if selector <= t["metadata"]["labels"].items()]
        assert selected, f"{name}: service {service['metadata']['name']} selects no pod"
        port_names = {p["name"] for t in selected for c in t["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_flags_and_environment_are_ones_the_processes_read(variant):
    name, objects = variant
    for key in config_map(objects):
        assert key in KNOWN_ENV, f"{name}: ConfigMap sets {key}, which nothing reads"
    for obj, container in ours(objects):
        known = WORKER_FLAGS if "dynamo_lite.vllm" in container["command"] else FRONTEND_FLAGS
        flags = {a for a in container["args"] if a.startswith("--")}
        assert flags <= known, f"{name}/{obj['metadata']['name']}: unknown flags {flags - known}"
        env = environment(objects, container)
        for var in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
            assert var in env, f"{name}: $({var}) is not in the container's environment"
        for key in env:
            assert key in KNOWN_ENV or key.startswith("UCX_"), f"{name}: {key} is read by nothing"


def test_planes_in_cluster_or_external(variant):
    name, objects = variant
    config = config_map(objects)
    sets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    if name == "external-planes":
        assert not sets
        assert "example" in config["ETCD_ENDPOINTS"] and config["NATS_SERVER"].startswith("nats://")
        return
    assert set(sets) == {"dynamo-lite-etcd", "dynamo-lite-nats"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for var, service in (("ETCD_ENDPOINTS", "dynamo-lite-etcd"), ("NATS_SERVER", "dynamo-lite-nats")):
        host, port = config[var].split("://")[1].split(":")
        assert host == service and int(port) in {p["port"] for p in services[service]["spec"]["ports"]}
        assert sets[service]["spec"]["volumeClaimTemplates"], f"{service} keeps its data on a volume"
    nats_args = sets["dynamo-lite-nats"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "-js" in nats_args  # JetStream on, as the launch scripts and CI run nats-server


def test_disaggregated_pools_use_nixl_over_rdma(variant):
    name, objects = variant
    workers = {o["metadata"]["name"]: (o, c) for o, c in ours(objects) if "dynamo_lite.vllm" in c["command"]}
    if name not in DISAGGREGATED:
        assert set(workers) == {"dynamo-lite-worker"}
        assert "--connector" not in workers["dynamo-lite-worker"][1]["args"]
        return
    assert set(workers) == {"dynamo-lite-worker", "dynamo-lite-prefill-worker"}
    for deployment, container in workers.values():
        args = container["args"]
        assert args[args.index("--connector") + 1] == "nixl"
        is_prefill = deployment["metadata"]["name"] == "dynamo-lite-prefill-worker"
        assert ("--is-prefill-worker" in args) == is_prefill
        env = environment(objects, container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["nixl"] == int(env["DYN_NIXL_SIDE_CHANNEL_PORT"])
        assert "rc" in env["UCX_TLS"].split(",") and env["UCX_NET_DEVICES"]
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]


def test_node_selectors_match_the_image_architecture(variant):
    name, objects = variant
    for obj, container in ours(objects):
        selector = obj["spec"]["template"]["spec"]["nodeSelector"]
        if name == "dgx-spark":
            assert selector == {"kubernetes.io/arch": "arm64", "dynamo-lite.io/dgx-spark": "true"}
        else:
            assert selector == {"kubernetes.io/arch": "amd64"}


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namePrefix": "x-"}))
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)
    base = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["x"]}
    merged = strategic_merge(base, {"env": [{"name": "B", "value": "3"}], "args": ["y"]})
    assert merged == {"env": [{"name": "B", "value": "3"}, {"name": "A", "value": "1"}], "args": ["y"]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to compare the renderer with")
def test_the_renderer_agrees_with_kubectl_kustomize(variant):
    name, objects = variant
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / name)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    assert {(o["kind"], o["metadata"]["name"]): o for o in objects} == theirs
