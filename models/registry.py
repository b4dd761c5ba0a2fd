"""Versioned model registry on a directory.

Layout::

    <root>/<version>/model.onnx
    <root>/<version>/manifest.json
    <root>/CURRENT            # name of the version to serve

Publishing writes a version directory completely, under a temporary name, then
renames it into place and swaps CURRENT atomically, so a reader never sees half an
artifact. Loading verifies the ONNX file's sha256 against the manifest, and the
input-schema hash against the schema itself, and refuses anything that does not match.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from service.tensors import InputSchema

CURRENT_FILE: Final = "CURRENT"
MODEL_FILE: Final = "model.onnx"
MANIFEST_FILE: Final = "manifest.json"
_VERSION_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RegistryError(RuntimeError):
    """The registry is empty, or an artifact is missing, corrupted or inconsistent."""


class Manifest(msgspec.Struct, frozen=True):
    """What a model version says about itself (manifest.json)."""

    version: str
    input_schema: dict[str, object]
    input_schema_hash: str
    output_dim: int
    sha256: str
    cold_start_embedding: list[float]
    normalized: bool = True
    parent_version: str | None = None
    kind: str = "sum"
    training_metrics: dict[str, float] = msgspec.field(default_factory=dict)
    created_at: str = ""

    @property
    def schema(self) -> InputSchema:
        return InputSchema.from_dict(self.input_schema)


@dataclass(frozen=True, slots=True)
class ModelArtifact:
    """A verified model version on disk."""

    manifest: Manifest
    model_path: Path

    @property
    def version(self) -> str:
        return self.manifest.version


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_version_name(version: str) -> str:
    if _VERSION_PATTERN.fullmatch(version) is None:
        raise RegistryError(
            f"invalid model version {version!r}: letters, digits, '_', '.', '-', up to 64 chars"
        )
    return version


def current_version(root: Path) -> str | None:
    """The version CURRENT points at, or None for an empty registry."""
    try:
        return (root / CURRENT_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def load_manifest(root: Path, version: str) -> Manifest:
    path = root / check_version_name(version) / MANIFEST_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        raise RegistryError(f"model {version}: {path} is missing") from None
    except msgspec.DecodeError as exc:
        raise RegistryError(f"model {version}: manifest.json is malformed: {exc}") from None


def load_artifact(root: Path, version: str | None = None) -> ModelArtifact:
    """Load and verify ``version`` (default: CURRENT); raise :class:`RegistryError` if unusable."""
    version = version or current_version(root)
    if version is None:
        raise RegistryError(f"model registry {root} is empty: publish a model first")
    manifest = load_manifest(root, version)
    if manifest.version != version:
        raise RegistryError(f"model {version}: manifest names version {manifest.version!r}")
    model_path = root / version / MODEL_FILE
    if not model_path.is_file():
        raise RegistryError(f"model {version}: {model_path} is missing")
    actual = _sha256(model_path)
    if actual != manifest.sha256:
        raise RegistryError(
            f"model {version}: sha256 of model.onnx is {actual[:12]}..., "
            f"manifest says {manifest.sha256[:12]}...: refusing a corrupted artifact"
        )
    if manifest.schema.digest() != manifest.input_schema_hash:
        raise RegistryError(f"model {version}: input schema does not match its hash")
    if len(manifest.cold_start_embedding) != manifest.output_dim:
        raise RegistryError(f"model {version}: cold-start embedding is not {manifest.output_dim}-d")
    return ModelArtifact(manifest=manifest, model_path=model_path)


def publish(
    root: Path,
    *,
    version: str,
    onnx_bytes: bytes,
    schema: InputSchema,
    output_dim: int,
    cold_start_embedding: list[float],
    normalized: bool = True,
    parent_version: str | None = None,
    kind: str = "sum",
    training_metrics: dict[str, float] | None = None,
    make_current: bool = True,
) -> ModelArtifact:
    """Write a new version atomically and (by default) make it CURRENT."""
    check_version_name(version)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise RegistryError(f"model {version} already exists in {root}: versions are immutable")
    manifest = Manifest(
        version=version,
        input_schema=schema.to_dict(),
        input_schema_hash=schema.digest(),
        output_dim=output_dim,
        sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        cold_start_embedding=[float(x) for x in cold_start_embedding],
        normalized=normalized,
        parent_version=parent_version,
        kind=kind,
        training_metrics=dict(training_metrics or {}),
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        (staging / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if make_current:
        set_current(root, version)
    return load_artifact(root, version)


def set_current(root: Path, version: str) -> None:
    """Point CURRENT at ``version`` (write-then-rename: readers see old or new, never half)."""
    load_artifact(root, version)
    tmp = root / f".{CURRENT_FILE}.{os.getpid()}"
    tmp.write_text(version + "\n")
    tmp.replace(root / CURRENT_FILE)
