"""Checks of the deployment as discovery sees it: the planes answer, every registered worker's advertised
address is reachable from this host, and every host runs the same dynamo_lite / vLLM / NIXL versions and
the same model files (the records' `versions` and `model_digest`, runtime/fingerprint.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from dynamo_lite import planes
from dynamo_lite.discovery.base import Discovery
from dynamo_lite.doctor.report import Check, fail, info, ok, warn
from dynamo_lite.protocol import keys
from dynamo_lite.protocol.messages import InstanceRecord, ModelCard

_records = msgspec.json.Decoder(InstanceRecord)
_cards = msgspec.json.Decoder(ModelCard)


@dataclass(frozen=True)
class Registered:
    record: InstanceRecord
    card: ModelCard | None

    def name(self) -> str:
        r = self.record
        return f"{r.component} {r.instance_id:x} ({r.hostname or r.host}, pid {r.pid})"


async def read_registered(discovery: Discovery, namespace: str) -> list[Registered]:
    """Every instance record of `namespace` with its model card (None if it has none)."""
    items, _ = await discovery.get_prefix(keys.instances_prefix(namespace))
    card_items, _ = await discovery.get_prefix(keys.models_prefix(namespace))
    cards = {}
    for key, value in card_items:
        try:
            cards[keys.parse_instance_id(key)] = _cards.decode(value)
        except (msgspec.DecodeError, ValueError):
            continue
    out = []
    for _, value in items:
        try:
            record = _records.decode(value)
        except msgspec.DecodeError:
            continue  # not ours to judge: the frontend skips it too
        out.append(Registered(record, cards.get(record.instance_id)))
    return sorted(out, key=lambda r: (r.record.component, r.record.instance_id))


async def check_discovery(url: str, timeout: float) -> tuple[list[Check], Discovery | None]:
    kind = planes.discovery_kind(url)
    if kind == "embedded":
        directory = url.split("://", 1)[1]
        if not os.path.isdir(directory):
            return [warn("discovery", f"embedded discovery in {directory}: nothing there yet (no component "
                                      "has started with these planes on this host)",
                         "start the stack, or give the doctor the planes it uses (--etcd-endpoints, "
                         "--discovery-dir)")], None
    try:
        discovery = await asyncio.wait_for(planes.connect_discovery(url, connect_wait=timeout), timeout + 1)
    except Exception as e:  # noqa: BLE001 - any failure to connect is the finding
        return [fail("discovery", f"{kind} discovery at {url} does not answer: {e}",
                     "is etcd running and reachable (ETCD_ENDPOINTS, firewall port 2379)?")], None
    where = "embedded (no server)" if kind == "embedded" else "etcd"
    return [ok("discovery", f"{where} at {url} answers")], discovery


async def check_nats(url: str, timeout: float) -> list[Check]:
    """The NATS server greets with `INFO {json}` on connect: reachable, and which version."""
    kind = planes.event_plane_kind(url)
    if kind != "nats":
        return [info("events", "embedded event plane (no broker): workers' buses connect directly")]
    checks = []
    for item in url.split(","):
        host, port = _host_port(item.strip(), 4222)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            finally:
                writer.close()
            if not line.startswith(b"INFO "):
                checks.append(fail("events", f"{host}:{port} answers, but not as a NATS server"))
                continue
            version = json.loads(line[5:]).get("version", "?")
            checks.append(ok("events", f"NATS {version} at {host}:{port} answers"))
        except (TimeoutError, OSError, ValueError) as e:
            checks.append(fail("events", f"NATS at {host}:{port} does not answer: {e or 'timeout'}",
                               "is nats-server running and reachable (NATS_SERVER, firewall port 4222)?"))
    return checks


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    rest = item.split("://", 1)[-1].split("@")[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host:
        return rest, default_port
    return host.strip("[]"), int(port)


async def check_reachable(registered: Sequence[Registered], timeout: float,
                          remote_discovery: bool) -> list[Check]:
    """A TCP connection to each worker's request-plane address, as the frontend would open it."""
    async def probe(entry: Registered) -> Check:
        r = entry.record
        host, port = _host_port(r.address, 0)
        if remote_discovery and _loopback(host):
            return fail("workers", f"{entry.name()} advertises {r.address}: a loopback address that no other "
                                   "host can reach", "start it with --advertise-host <its fabric address>")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.close()
        except (TimeoutError, OSError) as e:
            return fail("workers", f"{entry.name()} advertises {r.address}, unreachable from here: "
                                   f"{getattr(e, 'strerror', None) or e or 'timeout'}",
                        "a firewall, a wrong --advertise-host, or a dead worker whose lease has not expired")
        model = f"serves {r.model}" + (f" ({r.role})" if r.role else "")
        return ok("workers", f"{entry.name()} at {r.address} reachable, {model}")

    if not registered:
        return [warn("workers", "no worker is registered in this namespace",
                     "start workers, or pass the namespace they use (--namespace)")]
    return list(await asyncio.gather(*(probe(e) for e in registered)))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_versions(registered: Sequence[Registered], here: Mapping[str, str], hostname: str) -> list[Check]:
    """Each package's version across the workers' records and this host: one value, or a FAIL naming who
    runs which."""
    if not registered:
        return []
    seen: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for entry in registered:
        for package, version in entry.record.versions.items():
            seen[package][version].append(entry.name())
    if not any(e.record.versions for e in registered):
        return [warn("versions", "the workers publish no versions (started by an older dynamo_lite)")]
    for package, version in here.items():
        if package in seen or package == "dynamo_lite":
            seen[package][version].append(f"this host ({hostname})")
    checks = []
    for package in sorted(seen):
        versions = seen[package]
        if len(versions) == 1:
            version, who = next(iter(versions.items()))
            checks.append(ok("versions", f"{package} {version} everywhere ({len(who)} process"
                                         f"{'es' if len(who) != 1 else ''})"))
        else:
            detail = "; ".join(f"{v} on {', '.join(who)}" for v, who in sorted(versions.items()))
            checks.append(fail("versions", f"{package} differs: {detail}",
                               "install the same release on every host (scripts/setup.sh, pinned extras)"))
    return checks


def check_model_files(registered: Sequence[Registered],
                      local: Mapping[str, str] | None = None) -> list[Check]:
    """Per served model, one model-files digest across its workers (and `local`: {model: digest} of the
    folder given to the doctor)."""
    by_model: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for entry in registered:
        digest = entry.record.model_digest
        by_model[entry.record.model][digest or "unknown"].append(entry.name())
    for model, digest in (local or {}).items():
        if model in by_model:
            by_model[model][digest].append("the --model folder here")
    checks = []
    for model in sorted(by_model):
        digests = by_model[model]
        known = {d: who for d, who in digests.items() if d != "unknown"}
        if len(known) > 1:
            detail = "; ".join(f"{d} on {', '.join(who)}" for d, who in sorted(known.items()))
            checks.append(fail("model files", f"{model}: the workers' model files differ: {detail}",
                               "copy the same folder to every host (rsync -a), then restart the workers"))
        elif known:
            digest, who = next(iter(known.items()))
            checks.append(ok("model files", f"{model}: the same files ({digest}) on {len(who)} process"
                                            f"{'es' if len(who) != 1 else ''}"))
        if "unknown" in digests:
            checks.append(warn("model files", f"{model}: {', '.join(digests['unknown'])} publish no model "
                                              "digest (an older dynamo_lite)"))
    return checks
