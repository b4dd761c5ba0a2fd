"""The registry a command writes to: a directory, or an object store (fsspec URL).

``--registry`` takes either; without it, ``registry_url`` when set, else
``registry_path``. A version for an object store is built in a temporary directory
registry (seeded with the parent it aligns onto, from the remote), checked there as
any local version, then pushed (:meth:`models.registry_remote.ObjectRegistry.push`:
files, read-back checks, CURRENT last).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.registry import ModelArtifact, RegistryError, model_root
from models.registry_remote import ObjectRegistry, is_url
from models.registry_sync import RegistryMirror
from service.core.model_names import DEFAULT_MODEL


def resolve_registry(registry: str | None) -> tuple[str, dict[str, Any]]:
    """The registry location (a directory or a URL) and the URL's storage options."""
    from service.settings import Settings

    from_environment: dict[str, Any] = {}  # every field from USEREMBED_* or its default
    settings = Settings(**from_environment)
    location = registry or settings.registry_url or str(settings.registry_path)
    return location, dict(settings.registry_storage_options)


def open_remote(registry: str | None) -> ObjectRegistry | None:
    """The object-store registry the command names, or None for a directory."""
    location, options = resolve_registry(registry)
    return ObjectRegistry(location, options) if is_url(location) else None


@dataclass(frozen=True)
class Publisher:
    """The local registry of ``model`` to publish a version into (``root``), and
    :meth:`done` to put the published version where it belongs."""

    root: Path
    model: str
    remote: ObjectRegistry | None = None

    def done(self, artifact: ModelArtifact, *, make_current: bool = True) -> str:
        """Where the version now is: its directory, or its URL once pushed."""
        if self.remote is None:
            return str(artifact.directory)
        return self.remote.push(artifact, self.model, make_current=make_current)


@contextlib.contextmanager
def publishing(
    registry: str | None, model: str = DEFAULT_MODEL, *, parent: str | None = None
) -> Iterator[Publisher]:
    """A :class:`Publisher` for ``registry``; for an object store, its local root holds
    ``parent`` ("auto" = the remote CURRENT, made the local CURRENT) and its chain."""
    location, options = resolve_registry(registry)
    if not is_url(location):
        yield Publisher(model_root(Path(location), model), model)
        return
    remote = ObjectRegistry(location, options)
    with tempfile.TemporaryDirectory(prefix="userembed-publish-") as tmp:
        publisher = Publisher(model_root(Path(tmp), model), model, remote)
        version = remote.current_version(model) if parent == "auto" else parent
        if version is not None:
            report = RegistryMirror(remote, Path(tmp)).fetch(
                model, version, make_current=parent == "auto"
            )
            if model in report.refused:
                raise RegistryError(f"parent {version}: {report.refused[model]}")
        yield publisher
