"""Render deploy/k8s's kustomize overlays without a kustomize binary (none installs from the package
registries CI reaches), for the subset of kustomize those files use: `resources` (files and
directories), `components`, `patches` (strategic-merge patches from files, with an optional
`target` kind / name regex) and `images`. Any other kustomization key is refused, so a file that
starts using one fails the tests here instead of rendering wrong. Where `kubectl kustomize` exists,
tests/unit/test_deploy_k8s.py checks this renderer gives the same objects.

Strategic merge as Kubernetes does it for the fields used: maps merge, `null` deletes, lists of
containers / env / volumes merge by `name`, ports by `containerPort`, volumeMounts by `mountPath`;
every other list is replaced. Merged lists are ordered as kubectl orders them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "components", "patches", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "ports": "containerPort", "volumeMounts": "mountPath"}


class RenderError(Exception):
    pass


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(base, patch, field: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        # As kubectl orders them: the patch's items (merged into their base twins) first, then the rest.
        key = MERGE_KEYS[field]
        by_key = {item.get(key): item for item in base}
        merged = [strategic_merge(by_key[item.get(key)], item) if item.get(key) in by_key
                  else copy.deepcopy(item) for item in patch]
        patched = {item.get(key) for item in patch}
        return merged + [copy.deepcopy(item) for item in base if item.get(key) not in patched]
    return copy.deepcopy(patch)


def _matches(obj: dict, target: dict) -> bool:
    for field in ("kind", "name"):
        if field in target:
            value = obj["kind"] if field == "kind" else obj["metadata"]["name"]
            if not re.fullmatch(target[field], value):
                return False
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise RenderError(f"patch target fields not supported here: {sorted(unknown)}")
    return True


def _apply_patches(objects: list[dict], root: Path, patches: list[dict]) -> list[dict]:
    for entry in patches:
        if set(entry) - {"path", "target"}:
            raise RenderError(f"{root}: patch entry {entry} (only path and target are supported)")
        for patch in load_documents(root / entry["path"]):
            target = entry.get("target") or {"kind": re.escape(patch["kind"]),
                                              "name": re.escape(patch["metadata"]["name"])}
            hits = [i for i, obj in enumerate(objects) if _matches(obj, target)]
            if not hits:
                raise RenderError(f"{root / entry['path']}: patch matches no object ({target})")
            body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
            body["metadata"] = {k: v for k, v in patch.get("metadata", {}).items() if k != "name"}
            for i in hits:
                objects[i] = strategic_merge(objects[i], body)
    return objects


def _set_images(objects: list[dict], images: list[dict]) -> None:
    def rewrite(spec: dict) -> None:
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name = container["image"].split(":")[0]
            for image in images:
                if image["name"] == name:
                    new = image.get("newName", name)
                    container["image"] = f"{new}:{image['newTag']}" if "newTag" in image else new

    for obj in objects:
        template = obj.get("spec", {}).get("template")
        if template:
            rewrite(template["spec"])


def render(directory: Path, *, component: bool = False, objects: list[dict] | None = None) -> list[dict]:
    """The objects `kubectl kustomize directory` would print (in resource order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise RenderError(f"{directory}: kustomization keys this renderer does not know: "
                          f"{sorted(unsupported)}")
    expected_kind = "Component" if component else "Kustomization"
    if kustomization.get("kind") != expected_kind:
        raise RenderError(f"{directory}: kind {kustomization.get('kind')!r}, expected {expected_kind}")
    objects = list(objects or [])
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        objects += render(path) if path.is_dir() else load_documents(path)
    for name in kustomization.get("components", []):
        objects = render((directory / name).resolve(), component=True, objects=objects)
    objects = _apply_patches(objects, directory, kustomization.get("patches", []))
    _set_images(objects, kustomization.get("images", []))
    ids = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise RenderError(f"{directory}: objects defined twice: {sorted(duplicates)}")
    return objects
