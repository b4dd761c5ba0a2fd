"""``userembed registry push`` and ``registry sync``: object-store registries by hand."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_push(args: argparse.Namespace) -> None:
    """Push a version directory of a local registry (and the parents its alignment
    maps onto that the remote lacks) to an object-store registry."""
    from models.registry import (
        MANIFEST_FILE,
        MODELS_DIR,
        ModelArtifact,
        RegistryError,
        load_artifact,
    )
    from models.registry_target import open_remote
    from service.core.model_names import DEFAULT_MODEL

    remote = open_remote(args.url)
    if remote is None:
        raise RegistryError("registry push needs an object-store URL (or USEREMBED_REGISTRY_URL)")
    directory = Path(args.version_dir).resolve()
    artifact = load_artifact(directory.parent, directory.name)
    if args.model is None:  # <root>/_models/<name>/<version> is a version of <name>
        named = directory.parent.parent.name == MODELS_DIR
        args.model = directory.parent.name if named else DEFAULT_MODEL
    missing: list[ModelArtifact] = []
    alignment = artifact.manifest.alignment
    while alignment is not None and len(missing) < 64:
        parent = alignment.parent_version
        if remote.read_file(args.model, parent, MANIFEST_FILE) is not None:
            break
        try:
            ancestor = load_artifact(directory.parent, parent)
        except RegistryError:
            break  # not here either: the chain ends there, as it would locally
        missing.append(ancestor)
        alignment = ancestor.manifest.alignment
    for ancestor in reversed(missing):
        where = remote.push(ancestor, args.model, make_current=False)
        print(f"pushed parent {ancestor.version} to {where}")
    where = remote.push(artifact, args.model, make_current=not args.no_current)
    current = "" if args.no_current else " (now CURRENT)"
    print(f"pushed {artifact.version} of model {args.model} to {where}{current}")


def cmd_sync(args: argparse.Namespace) -> None:
    """One mirror pass of an object-store registry into a local directory."""
    from models.registry import RegistryError
    from models.registry_sync import RegistryMirror
    from models.registry_target import open_remote
    from service.settings import Settings

    remote = open_remote(args.url)
    if remote is None:
        raise RegistryError("registry sync needs an object-store URL (or USEREMBED_REGISTRY_URL)")
    from_environment: dict[str, Any] = {}
    cache = Path(args.cache) if args.cache else Settings(**from_environment).registry_path
    report = RegistryMirror(remote, cache).sync()
    if report.error:
        raise RegistryError(f"{remote.url} could not be read: {report.error}")
    for model, version in report.current.items():
        print(f"{model}: {version} in {cache}")
    for model, reason in report.refused.items():
        print(f"{model}: refused: {reason}")
    for model in report.retired:
        print(f"{model}: retired")
    if report.refused:
        raise SystemExit(1)


def add_registry_commands(sub: Any) -> None:
    """``registry push`` and ``registry sync`` under the ``userembed`` parser."""
    registry = sub.add_parser(
        "registry", help="object-store registries: push a version, mirror one (docs/registry.md)"
    )
    commands = registry.add_subparsers(dest="registry_command", required=True)
    push = commands.add_parser(
        "push", help="push a local version directory to an object store, CURRENT written last"
    )
    push.add_argument("version_dir", help="a version directory of a local registry")
    push.add_argument("url", nargs="?", help="s3://bucket/prefix (default: registry_url)")
    push.add_argument(
        "--model",
        help="the model it is a version of (default: <name> for <root>/_models/<name>/<version>, "
        "else 'default')",
    )
    push.add_argument("--no-current", action="store_true", help="push without making CURRENT")
    push.set_defaults(func=cmd_push)
    sync = commands.add_parser(
        "sync", help="mirror an object-store registry into a local directory once"
    )
    sync.add_argument("url", nargs="?", help="s3://bucket/prefix (default: registry_url)")
    sync.add_argument("--cache", help="local directory (default: registry_path)")
    sync.set_defaults(func=cmd_sync)
