"""A small kustomize renderer for the subset deploy/k8s uses (CI has no kustomize binary).

Supported, with kustomize's semantics for these cases:

* ``resources`` (YAML files, directories holding a kustomization) and ``components``
  (``kind: Component``: its resources and generators join the parent's, its patches
  apply to everything accumulated so far);
* ``configMapGenerator`` (``files``, ``literals``, ``options.labels``), only with
  ``generatorOptions.disableNameSuffixHash: true`` (no name-reference rewriting needed);
* ``patches``: strategic merge (``path`` or inline, target taken from the patch's
  kind/name) on Deployments, StatefulSets and ConfigMaps, with the merge keys of the
  fields we patch and ``null`` deleting a key; JSON 6902 (add, remove, replace) with a
  ``target`` of group/version/kind/name/labelSelector (``k=v`` pairs);
* ``namespace``, ``labels`` (``includeSelectors: false``: metadata only), ``replicas``,
  ``images`` (``newName``/``newTag``), applied in that order after the patches.

Anything else raises :class:`Unsupported`, so a manifest never renders silently wrong.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KNOWN_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "labels",
    "images",
    "replicas",
    "patches",
    "configMapGenerator",
    "generatorOptions",
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "PriorityClass",
    "StorageClass",
}
SMP_KINDS = {"Deployment", "StatefulSet", "ConfigMap"}
# Strategic-merge keys of the list fields our patches touch (from the Kubernetes API's
# x-kubernetes-patch-merge-key); other lists are replaced, as kustomize does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


class Unsupported(ValueError):
    """The kustomization uses a feature this renderer does not implement."""


def render(directory: Path) -> list[Obj]:
    """The objects ``kustomize build directory`` would print (for the supported subset)."""
    return _build(directory.resolve(), [], expect_kind="Kustomization")


def _load_kustomization(directory: Path) -> Obj:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            unknown = set(data) - KNOWN_FIELDS
            if unknown:
                raise Unsupported(f"{path}: unsupported kustomization fields {sorted(unknown)}")
            return dict(data)
    raise FileNotFoundError(f"no kustomization in {directory}")


def _load_yaml_docs(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _within(root: Path, path: Path) -> Path:
    """Kustomize's default load restrictor: files must be under the kustomization root."""
    resolved = (root / path).resolve()
    if root != resolved and root not in resolved.parents:
        raise Unsupported(f"{path} is outside {root} (kustomize's load restrictor refuses it)")
    return resolved


def _build(directory: Path, accumulated: list[Obj], expect_kind: str) -> list[Obj]:
    k = _load_kustomization(directory)
    kind = k.get("kind", "Kustomization")
    if kind != expect_kind:
        raise Unsupported(f"{directory}: expected a {expect_kind}, found {kind}")
    objects = accumulated
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects = objects + _build(path, [], expect_kind="Kustomization")
        else:
            objects = objects + _load_yaml_docs(_within(directory, Path(entry)))
    for entry in k.get("components", []):
        objects = _build((directory / entry).resolve(), objects, expect_kind="Component")
    objects = objects + _generate(directory, k)
    for patch in k.get("patches", []):
        objects = _apply_patch(directory, objects, patch)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if entry.get("includeSelectors", False) or entry.get("includeTemplates", False):
            raise Unsupported("labels with includeSelectors/includeTemplates")
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for entry in k.get("replicas", []):
        matched = [
            o
            for o in objects
            if o["kind"] in {"Deployment", "StatefulSet"} and o["metadata"]["name"] == entry["name"]
        ]
        if not matched:
            raise Unsupported(f"replicas: no Deployment/StatefulSet named {entry['name']}")
        for obj in matched:
            obj["spec"]["replicas"] = entry["count"]
    for entry in k.get("images", []):
        _set_image(objects, entry)
    return objects


def _generate(directory: Path, k: Obj) -> list[Obj]:
    generators = k.get("configMapGenerator", [])
    if not generators:
        return []
    if not k.get("generatorOptions", {}).get("disableNameSuffixHash", False):
        raise Unsupported("configMapGenerator without generatorOptions.disableNameSuffixHash")
    out = []
    for gen in generators:
        unknown = set(gen) - {"name", "files", "literals", "options"}
        if unknown:
            raise Unsupported(f"configMapGenerator fields {sorted(unknown)}")
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
            path = _within(directory, Path(source))
            data[key or path.name] = path.read_text()
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        metadata: Obj = {"name": gen["name"]}
        labels = gen.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = dict(labels)
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return out


def _group_version(obj: Obj) -> tuple[str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version


def _matches(obj: Obj, target: Obj) -> bool:
    group, version = _group_version(obj)
    unknown = set(target) - {"group", "version", "kind", "name", "labelSelector"}
    if unknown:
        raise Unsupported(f"patch target fields {sorted(unknown)}")
    if "group" in target and target["group"] != group:
        return False
    if "version" in target and target["version"] != version:
        return False
    if "kind" in target and target["kind"] != obj["kind"]:
        return False
    if "name" in target and target["name"] != obj["metadata"]["name"]:
        return False
    if "labelSelector" in target:
        labels = obj["metadata"].get("labels", {})
        for term in target["labelSelector"].split(","):
            key, sep, value = term.partition("=")
            if not sep or "!" in key:
                raise Unsupported(f"labelSelector term {term!r}: only k=v")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def _apply_patch(directory: Path, objects: list[Obj], patch: Obj) -> list[Obj]:
    unknown = set(patch) - {"path", "patch", "target"}
    if unknown:
        raise Unsupported(f"patch fields {sorted(unknown)}")
    text = (
        _within(directory, Path(patch["path"])).read_text() if "path" in patch else patch["patch"]
    )
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if docs and isinstance(docs[0], list):  # JSON 6902
        if "target" not in patch:
            raise Unsupported("a JSON 6902 patch needs a target")
        targets = [o for o in objects if _matches(o, patch["target"])]
        if not targets:
            raise Unsupported(f"patch target {patch['target']} matches nothing")
        for obj in targets:
            for op in docs[0]:
                _json6902(obj, op)
        return objects
    if "target" in patch:
        raise Unsupported("strategic-merge patches with an explicit target")
    for doc in docs:
        if doc["kind"] not in SMP_KINDS:
            raise Unsupported(f"strategic merge on {doc['kind']}")
        targets = [
            o
            for o in objects
            if o["kind"] == doc["kind"] and o["metadata"]["name"] == doc["metadata"]["name"]
        ]
        if len(targets) != 1:
            raise Unsupported(
                f"patch for {doc['kind']}/{doc['metadata']['name']}: no unique target"
            )
        body = {k: v for k, v in doc.items() if k not in {"apiVersion", "kind", "metadata"}}
        _strategic_merge(targets[0], body)
    return objects


def _strategic_merge(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if isinstance(key, str) and key.startswith("$"):
            raise Unsupported(f"strategic-merge directive {key}")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _strategic_merge(target[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = MERGE_KEYS[key]
            for item in value:
                existing = [t for t in target[key] if t.get(merge_key) == item.get(merge_key)]
                if existing:
                    _strategic_merge(existing[0], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise Unsupported(f"JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(obj: Obj, op: Obj) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if kind not in {"add", "remove", "replace"}:
        raise Unsupported(f"JSON 6902 op {kind}")
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            del node[index]
        else:
            node[index] = copy.deepcopy(op["value"])
        return
    if kind in {"remove", "replace"} and last not in node:
        raise Unsupported(f"JSON 6902 {kind} of missing {op['path']}")
    if kind == "remove":
        del node[last]
    else:
        node[last] = copy.deepcopy(op["value"])


_IMAGE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>.+))?$")


def split_image(image: str) -> tuple[str, str | None]:
    """``registry:5000/repo/name:tag`` -> (``registry:5000/repo/name``, ``tag``)."""
    match = _IMAGE.match(image)
    if match is None:
        raise ValueError(f"unparsable image {image!r}")
    return match["name"], match["tag"]


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]  # type: ignore[no-any-return]
    return None


def _set_image(objects: list[Obj], entry: Obj) -> None:
    unknown = set(entry) - {"name", "newName", "newTag"}
    if unknown:
        raise Unsupported(f"images fields {sorted(unknown)}")
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            name, tag = split_image(container["image"])
            if name != entry["name"]:
                continue
            new_tag = entry.get("newTag", tag)
            new_name = entry.get("newName", name)
            container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
