"""Versioned model registry on a directory, with named models side by side.

Layout of one model::

    <root>/<version>/model.onnx
    <root>/<version>/manifest.json
    <root>/<version>/alignment.npy   # optional: this space -> the parent's (Procrustes)
    <root>/CURRENT                   # name of the version to serve

The registry root is the model named ``default`` (so a registry written before there
were several models reads unchanged); every other model ``<name>`` is a registry of
its own under ``<root>/_models/<name>/`` (a version name starts with a letter or
digit, so ``_models`` is never a version). A model is served while its directory has
a CURRENT; retiring it renames CURRENT to RETIRED (``set_current`` serves it again).

Publishing writes a version directory completely under a temporary dot-name,
fsyncs the files and the directory, renames it into place and swaps CURRENT by
write-fsync-rename, so a reader never sees half an artifact, even after a crash.
Loading verifies the sha256 of every file against the manifest, the input-schema
hash against the schema, the ONNX graph's inputs against the schema, and
(optionally) the schema against the one the caller assembles; it refuses any
mismatch with a clear error.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
import onnx

from models.alignment import FittedAlignment
from service.core.model_names import DEFAULT_MODEL, check_model_name
from service.core.tensors import InputSchema

CURRENT_FILE: Final = "CURRENT"
RETIRED_FILE: Final = "RETIRED"
MODELS_DIR: Final = "_models"
MODEL_FILE: Final = "model.onnx"
FP16_MODEL_FILE: Final = "model.fp16.onnx"
MANIFEST_FILE: Final = "manifest.json"
ALIGNMENT_FILE: Final = "alignment.npy"
_VERSION_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RegistryError(RuntimeError):
    """The registry is empty, or an artifact is missing, corrupted or inconsistent."""


class Alignment(msgspec.Struct, frozen=True):
    """An orthogonal map (alignment.npy) from this version's space onto the parent's.

    ``parent_embedding ~= embedding @ R``; the cosines say how much drift it removes.
    """

    parent_version: str
    file: str
    sha256: str
    sample_size: int
    mean_cosine_before: float
    mean_cosine_after: float


class Manifest(msgspec.Struct, frozen=True):
    """What a model version says about itself (manifest.json). New fields need defaults
    so that older manifests keep loading."""

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
    alignment: Alignment | None = None
    # free-form facts about the model: tower config, export parity, extra files
    details: dict[str, object] = msgspec.field(default_factory=dict)
    files: dict[str, str] = msgspec.field(default_factory=dict)  # extra file -> sha256

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

    @property
    def directory(self) -> Path:
        return self.model_path.parent

    @property
    def fp16_model_path(self) -> Path | None:
        """The artifact's own fp16 graph (sha-checked like every listed file), if any."""
        return self.directory / FP16_MODEL_FILE if FP16_MODEL_FILE in self.manifest.files else None

    def alignment_matrix(self) -> npt.NDArray[np.float32] | None:
        """R with parent ~= self @ R, or None when the version has no alignment."""
        if self.manifest.alignment is None:
            return None
        matrix = np.load(self.directory / self.manifest.alignment.file, allow_pickle=False)
        return np.asarray(matrix, dtype=np.float32)


def served_space(root: Path, artifact: ModelArtifact) -> tuple[str, npt.NDArray[np.float32] | None]:
    """The space ``artifact``'s embeddings are served in, and the map R into it.

    An aligned version maps onto its parent's served space, recursively
    (v3 -> v2 -> v1 composes R3 @ R2). The chain ends at a version without an
    alignment, or at a parent that is no longer in the registry (or fails its
    checks): its space is still the parent's, since R was stored with the child.
    """
    space, matrix = artifact.version, None
    seen = {artifact.version}
    current: ModelArtifact | None = artifact
    while current is not None and current.manifest.alignment is not None:
        rotation = current.alignment_matrix()
        dim = current.manifest.output_dim
        if rotation is None or rotation.shape != (dim, dim):
            raise RegistryError(f"model {current.version}: alignment.npy is not {dim}x{dim}")
        matrix = rotation if matrix is None else matrix @ rotation
        space = current.manifest.alignment.parent_version
        if space in seen:
            raise RegistryError(f"model {artifact.version}: alignment chain loops at {space}")
        seen.add(space)
        try:
            current = load_artifact(root, space)
        except RegistryError:
            current = None
    return space, matrix


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


def list_versions(root: Path) -> list[str]:
    """Published versions, oldest first (staging directories start with '.', and
    ``_models`` holds the named models)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _VERSION_PATTERN.fullmatch(p.name)]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]


def model_root(root: Path, model: str = DEFAULT_MODEL) -> Path:
    """The registry of the model ``model``: the root itself for the default model."""
    if check_model_name(model) == DEFAULT_MODEL:
        return root
    return root / MODELS_DIR / model


def served_models(root: Path) -> list[str]:
    """The models with a CURRENT: ``default`` first, then the named ones by name."""
    names = [DEFAULT_MODEL] if (root / CURRENT_FILE).is_file() else []
    models = root / MODELS_DIR
    if models.is_dir():
        names += sorted(
            p.name
            for p in models.iterdir()
            if p.name != DEFAULT_MODEL and (p / CURRENT_FILE).is_file()
        )
    return names


def retire_model(root: Path, model: str) -> str:
    """Stop serving ``model``: its CURRENT becomes RETIRED (versions stay); returns
    the version it served."""
    directory = model_root(root, model)
    version = current_version(directory)
    if version is None:
        raise RegistryError(f"model {model!r} is not served by {root}")
    (directory / CURRENT_FILE).replace(directory / RETIRED_FILE)
    _fsync_dir(directory)
    return version


def _check_graph_inputs(version: str, model_path: Path, schema: InputSchema) -> None:
    """The ONNX graph must take the schema's inputs with the schema's static shapes."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    wanted = schema.inputs()
    for value in graph.input:
        if value.name not in wanted:
            continue  # initializers listed as inputs by old exporters
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        expected = wanted[value.name][1]
        if [d if isinstance(d, int) else "dyn" for d in dims[1:]] != expected[1:]:
            raise RegistryError(
                f"model {version}: input {value.name} has shape {dims}, its manifest schema "
                f"says {expected}: refusing a model whose graph does not match its schema"
            )


def load_artifact(
    root: Path, version: str | None = None, *, expected_schema: InputSchema | None = None
) -> ModelArtifact:
    """Load and verify ``version`` (default: CURRENT); raise :class:`RegistryError` if unusable.

    ``expected_schema``: the schema the caller will assemble tensors with; a model
    trained on another schema is refused instead of being fed the wrong tensors.
    """
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
    if expected_schema is not None and expected_schema.digest() != manifest.input_schema_hash:
        raise RegistryError(
            f"model {version}: input schema {manifest.input_schema_hash[:12]}... "
            f"({manifest.schema}) differs from the expected {expected_schema.digest()[:12]}... "
            f"({expected_schema}): refusing to feed it tensors of another schema"
        )
    if len(manifest.cold_start_embedding) != manifest.output_dim:
        raise RegistryError(f"model {version}: cold-start embedding is not {manifest.output_dim}-d")
    extra = dict(manifest.files)
    if manifest.alignment is not None:
        extra[manifest.alignment.file] = manifest.alignment.sha256
    for name, digest in extra.items():
        path = root / version / name
        if not path.is_file() or _sha256(path) != digest:
            raise RegistryError(f"model {version}: {name} is missing or its sha256 does not match")
    _check_graph_inputs(version, model_path, manifest.schema)
    return ModelArtifact(manifest=manifest, model_path=model_path)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    details: dict[str, object] | None = None,
    extra_files: dict[str, bytes] | None = None,
    alignment: FittedAlignment | None = None,
) -> ModelArtifact:
    """Write a new version atomically and (by default) make it CURRENT.

    With a ``parent_version`` and the ``alignment`` fitted onto it (the orthogonal map
    from this version's embeddings onto the parent's, see :mod:`models.alignment`),
    also store it as alignment.npy with the drift it removes.
    """
    check_version_name(version)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise RegistryError(f"model {version} already exists in {root}: versions are immutable")
    files = dict(extra_files or {})
    for name in files:
        if name in (MODEL_FILE, MANIFEST_FILE, ALIGNMENT_FILE) or "/" in name:
            raise RegistryError(f"extra file name {name!r} is reserved or not a plain name")
    stored_alignment = None
    if alignment is not None:
        if parent_version is None:
            raise RegistryError(
                f"model {version}: an alignment needs the parent_version it maps onto"
            )
        fitted = alignment
        buffer = io.BytesIO()
        np.save(buffer, fitted.rotation.astype(np.float32), allow_pickle=False)
        files[ALIGNMENT_FILE] = buffer.getvalue()
        stored_alignment = Alignment(
            parent_version=parent_version,
            file=ALIGNMENT_FILE,
            sha256=hashlib.sha256(files[ALIGNMENT_FILE]).hexdigest(),
            sample_size=fitted.sample_size,
            mean_cosine_before=fitted.mean_cosine_before,
            mean_cosine_after=fitted.mean_cosine_after,
        )
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
        alignment=stored_alignment,
        details=dict(details or {}),
        files={
            name: hashlib.sha256(data).hexdigest()
            for name, data in files.items()
            if name != ALIGNMENT_FILE
        },
    )
    manifest_bytes = msgspec.json.format(msgspec.json.encode(manifest))
    _write_version(root, version, {MODEL_FILE: onnx_bytes, **files, MANIFEST_FILE: manifest_bytes})
    if make_current:
        set_current(root, version)
    return load_artifact(root, version)


def _write_version(root: Path, version: str, files: dict[str, bytes]) -> None:
    """Write a whole version directory: staged under a temporary name, every file and
    the directory fsynced, then renamed into place, so a reader never sees half of it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        for name, data in files.items():
            _write_synced(staging / name, data)
        _fsync_dir(staging)
        staging.rename(root / version)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def install(root: Path, artifact: ModelArtifact, *, make_current: bool = True) -> ModelArtifact:
    """Copy a verified version from another registry (byte for byte, manifest included),
    with the same staging, fsync and rename as :func:`publish`."""
    version = artifact.version
    root.mkdir(parents=True, exist_ok=True)
    if not (root / version).exists():
        files = {f.name: f.read_bytes() for f in artifact.directory.iterdir() if f.is_file()}
        _write_version(root, version, files)
    if make_current:
        set_current(root, version)
    return load_artifact(root, version)


def set_current(root: Path, version: str) -> None:
    """Point CURRENT at ``version`` (write-then-rename: readers see old or new, never half)."""
    load_artifact(root, version)
    tmp = root / f".{CURRENT_FILE}.{os.getpid()}.{time.monotonic_ns()}"
    _write_synced(tmp, (version + "\n").encode())
    tmp.replace(root / CURRENT_FILE)
    _fsync_dir(root)
