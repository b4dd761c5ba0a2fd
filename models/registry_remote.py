"""The model registry on an object store: the layout of :mod:`models.registry` under an
fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).

An object store has no rename, so publishing is made atomic by order instead: every
file of a version is written under the version's own prefix (manifest.json last),
read back and checked (size and sha256), and only then is the model's CURRENT
object written. A reader starts from CURRENT, so it never sees a version that is
half written; a version prefix without a CURRENT naming it is never served.
Versions are immutable: pushing a version again is allowed only with the same
manifest (a retried push), never with another one.

Readers do not read the store on their hot path: :mod:`models.registry_sync` mirrors
it into a local directory registry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from models.registry import (
    CURRENT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    MODELS_DIR,
    RETIRED_FILE,
    Manifest,
    ModelArtifact,
    RegistryError,
)
from service.core.model_names import DEFAULT_MODEL, MODEL_NAME_PATTERN, check_model_name

log = logging.getLogger(__name__)

CHUNK: Final = 4 << 20
_MODEL_NAME: Final = re.compile(MODEL_NAME_PATTERN)


class DownloadAborted(RuntimeError):
    """A download was abandoned because its owner is stopping."""


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether a ``--registry`` / setting names an object-store URL rather than a directory."""
    return "://" in str(location)


def artifact_files(manifest: Manifest) -> dict[str, str]:
    """Every file of a version but manifest.json, with the sha256 its manifest gives."""
    files = {MODEL_FILE: manifest.sha256, **manifest.files}
    if manifest.alignment is not None:
        files[manifest.alignment.file] = manifest.alignment.sha256
    for name in files:
        if not name or name.startswith(".") or "/" in name or "\\" in name or name == MANIFEST_FILE:
            raise RegistryError(f"model {manifest.version}: file name {name!r} is not plain")
    return files


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectRegistry:
    """A registry under ``url``; ``storage_options`` go to fsspec (endpoint, profile...)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - the objectstore extra is not installed
            raise RegistryError(
                f"registry {url}: an object-store registry needs fsspec (and s3fs for s3://): "
                "pip install 'userembed[objectstore]'"
            ) from None
        self.url = url.rstrip("/")
        options = dict(storage_options or {})
        self._local = self.url.startswith(("file://", "local://"))
        if self._local:
            options.setdefault("auto_mkdir", True)  # an object store has no directories
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as exc:
            raise RegistryError(f"registry {self.url}: {exc}") from None
        self.fs: Any = fs
        self._root = str(root).rstrip("/")

    # --- paths -------------------------------------------------------------------------

    def _model_path(self, model: str) -> str:
        if check_model_name(model) == DEFAULT_MODEL:
            return self._root
        return f"{self._root}/{MODELS_DIR}/{model}"

    def _path(self, model: str, *parts: str) -> str:
        return "/".join((self._model_path(model), *parts))

    def location(self, model: str, *parts: str) -> str:
        """The URL of a model's prefix (or of a version or file under it), for messages."""
        relative = self._path(model, *parts)[len(self._root) :]
        return self.url + relative

    # --- reading -----------------------------------------------------------------------

    def refresh(self) -> None:
        """Forget cached listings (s3fs caches them): the next calls see the store as it is."""
        self.fs.invalidate_cache()

    def _read(self, path: str) -> bytes | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return bytes(data)

    def current_version(self, model: str = DEFAULT_MODEL) -> str | None:
        """What the model's CURRENT names (unchecked), or None when it has none."""
        data = self._read(self._path(model, CURRENT_FILE))
        return None if data is None else data.decode(errors="replace").strip() or None

    def served(self) -> dict[str, str]:
        """Each model with a CURRENT (``default`` first, then by name) -> what it names.

        Any error but a missing object propagates: an unreachable store is never read
        as "every model retired"."""
        self.refresh()
        names: list[str] = []
        try:
            entries = self.fs.ls(f"{self._root}/{MODELS_DIR}", detail=False)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            name = posixpath.basename(str(entry).rstrip("/"))
            # a stray object is not a model: publish never writes such a name
            if _MODEL_NAME.fullmatch(name) and name != DEFAULT_MODEL:
                names.append(name)
        found = {}
        for name in [DEFAULT_MODEL, *sorted(names)]:
            version = self.current_version(name)
            if version is not None:
                found[name] = version
        return found

    def read_file(self, model: str, version: str, name: str) -> bytes | None:
        """A file of a version, or None when it is missing."""
        return self._read(self._path(model, version, name))

    def fingerprint(self, model: str, version: str) -> tuple[tuple[str, int, str], ...]:
        """The version's objects (name, size, ETag or mtime): changes when any is rewritten."""
        try:
            entries = self.fs.ls(self._path(model, version), detail=True)
        except FileNotFoundError:
            return ()
        marks = []
        for info in entries:
            tag = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
            name = posixpath.basename(str(info["name"]).rstrip("/"))
            marks.append((name, int(info.get("size") or 0), str(tag)))
        return tuple(sorted(marks))

    def download(
        self,
        model: str,
        version: str,
        name: str,
        target: Path,
        abort: threading.Event | None = None,
    ) -> tuple[str, int]:
        """Stream a file of a version into ``target`` (fsynced); its sha256 and size."""
        digest = hashlib.sha256()
        size = 0
        with self.fs.open(self._path(model, version, name), "rb") as src, target.open("wb") as dst:
            while chunk := src.read(CHUNK):
                if abort is not None and abort.is_set():
                    raise DownloadAborted(f"download of {self.location(model, version, name)}")
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        return digest.hexdigest(), size

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    # --- publishing --------------------------------------------------------------------

    def _put_file(self, local: Path, path: str) -> None:
        self.fs.put_file(str(local), path)

    def _put_bytes(self, path: str, data: bytes) -> None:
        if not self._local:
            self.fs.pipe_file(path, data)  # one PUT: readers see the old or the new object
            return
        parent, name = path.rsplit("/", 1)  # a file is written in place: write, then rename
        staged = f"{parent}/.{name}.{uuid.uuid4().hex}"
        self.fs.pipe_file(staged, data)
        self.fs.mv(staged, path)

    def _verify(self, model: str, version: str, expected: dict[str, tuple[str, int]]) -> None:
        """Read every written file back: its size and sha256 must be the local ones."""
        self.refresh()
        for name, (sha256, size) in expected.items():
            path = self._path(model, version, name)
            where = self.location(model, version, name)
            try:
                stored = int(self.fs.info(path)["size"])
            except FileNotFoundError:
                raise RegistryError(f"push of {version}: {where} is missing after upload") from None
            if stored != size:
                raise RegistryError(f"push of {version}: {where} has {stored} bytes, not {size}")
            actual = self._sha256(path)
            if actual != sha256:
                raise RegistryError(
                    f"push of {version}: {where} reads back with sha256 {actual[:12]}..., "
                    f"not {sha256[:12]}..."
                )

    def push(
        self, artifact: ModelArtifact, model: str = DEFAULT_MODEL, *, make_current: bool = True
    ) -> str:
        """Publish a verified local version (byte for byte) and, by default, make it CURRENT;
        returns the version's URL. CURRENT is written only after every file verified."""
        version = artifact.version
        manifest_bytes = (artifact.directory / MANIFEST_FILE).read_bytes()
        self.refresh()
        existing = self.read_file(model, version, MANIFEST_FILE)
        if existing is not None and existing != manifest_bytes:
            raise RegistryError(
                f"model {version} already exists in {self.location(model)} with another "
                "manifest: versions are immutable"
            )
        expected: dict[str, tuple[str, int]] = {}
        for name in artifact_files(artifact.manifest):
            local = artifact.directory / name
            expected[name] = (_sha256_file(local), local.stat().st_size)
            self._put_file(local, self._path(model, version, name))
        self._put_bytes(self._path(model, version, MANIFEST_FILE), manifest_bytes)
        expected[MANIFEST_FILE] = (hashlib.sha256(manifest_bytes).hexdigest(), len(manifest_bytes))
        self._verify(model, version, expected)
        log.info("event=registry_pushed model=%s version=%s url=%s", model, version, self.url)
        if make_current:
            self.set_current(model, version)
        return self.location(model, version)

    def set_current(self, model: str, version: str) -> None:
        """Point the model's CURRENT at a published version (one object write: a reader
        sees the old or the new name, never half)."""
        if self.read_file(model, version, MANIFEST_FILE) is None:
            raise RegistryError(
                f"model {version} is not published in {self.location(model)}: push it first"
            )
        self._put_bytes(self._path(model, CURRENT_FILE), (version + "\n").encode())
        if self.current_version(model) != version:
            raise RegistryError(
                f"{self.location(model, CURRENT_FILE)} does not read back {version}"
            )

    def retire(self, model: str) -> str:
        """Stop serving ``model``: its CURRENT becomes RETIRED; returns the version it served."""
        version = self.current_version(model)
        if version is None:
            raise RegistryError(f"model {model!r} is not served by {self.url}")
        self._put_bytes(self._path(model, RETIRED_FILE), (version + "\n").encode())
        self.fs.rm_file(self._path(model, CURRENT_FILE))
        return version
