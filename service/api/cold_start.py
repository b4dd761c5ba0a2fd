"""The models the API serves and each one's cold-start embedding, following the registry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from models.registry import (
    Manifest,
    RegistryError,
    current_version,
    load_artifact,
    model_root,
    served_models,
    served_space,
)
from service.core.embeddings import packed_vector
from service.core.model_names import DEFAULT_MODEL

log = logging.getLogger(__name__)

ColdStartStatus = Literal["available", "unavailable", "disabled"]


@dataclass(frozen=True, slots=True)
class ColdStart:
    """The model's embedding for a user with no history, expressed in ``space_version``
    (the space the worker writes records in), so a pinned reader can compare spaces."""

    vector: npt.NDArray[np.float32]
    model_version: str
    space_version: str = ""
    packed: bytes = field(init=False, repr=False, compare=False)  # float32, little-endian

    def __post_init__(self) -> None:
        if not self.space_version:
            object.__setattr__(self, "space_version", self.model_version)
        object.__setattr__(self, "packed", packed_vector(self.vector, "float32"))

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        space_version: str | None = None,
        to_space: npt.NDArray[np.float32] | None = None,
    ) -> ColdStart:
        vector = np.asarray(manifest.cold_start_embedding, dtype=np.float32)
        if to_space is not None:
            vector = (vector @ to_space).astype(np.float32)
        return cls(vector, manifest.version, space_version or manifest.version)


ColdStartSource = Callable[[], ColdStart | None]
"""The default model's cold start (the API's interface before there were several models)."""


@dataclass(frozen=True, slots=True)
class ModelState:
    """What the API knows of one served model (``GET /v1/models``): the version whose
    cold start it loaded (or, when none could be loaded, the one CURRENT names)."""

    name: str
    version: str | None
    space_version: str | None = None
    dim: int | None = None
    input_schema_hash: str | None = None
    cold_start_loaded: bool = False

    def cold_start_status(self, disabled: bool) -> ColdStartStatus:
        """``disabled`` (``cold_start_404``), else whether the cold start is loaded."""
        if disabled:
            return "disabled"
        return "available" if self.cold_start_loaded else "unavailable"


@runtime_checkable
class ServedModels(Protocol):
    """The models the API serves (the default model first) and their cold starts."""

    def served(self) -> Sequence[str]: ...

    def cold_start(self, model: str) -> ColdStart | None: ...

    def states(self) -> list[ModelState]: ...


class SingleModel:
    """The default model alone, its cold start from a :data:`ColdStartSource`."""

    def __init__(self, source: ColdStartSource) -> None:
        self._source = source

    def served(self) -> Sequence[str]:
        return (DEFAULT_MODEL,)

    def cold_start(self, model: str) -> ColdStart | None:
        return self._source() if model == DEFAULT_MODEL else None

    def states(self) -> list[ModelState]:
        cold = self._source()
        if cold is None:
            return [ModelState(DEFAULT_MODEL, None)]
        dim = int(cold.vector.shape[0])
        return [ModelState(DEFAULT_MODEL, cold.model_version, cold.space_version, dim, None, True)]


def as_served_models(source: ColdStartSource | ServedModels) -> ServedModels:
    """``source`` itself when it knows several models, else the default model alone."""
    return source if isinstance(source, ServedModels) else SingleModel(source)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """A model's cold start as loaded for CURRENT ``version`` (None: retry next time)."""

    version: str | None
    cold_start: ColdStart | None
    state: ModelState


class RegistryColdStart:
    """Follows the registry's served models and each one's CURRENT, re-checking at most
    every ``recheck_s`` seconds: a published model appears, a retired one disappears.

    The API never runs a model: on a new version it verifies the artifact once and maps
    the manifest's cold-start embedding into the version's served space (its alignment
    chain), as the worker does for real embeddings. A version that cannot be loaded
    leaves the model's last good cold start in place (and is tried again at the next
    check). Called, it is the default model's :data:`ColdStartSource`.
    """

    def __init__(
        self,
        root: Path,
        recheck_s: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._root = root
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._checked_at = float("-inf")
        self._models: dict[str, _Loaded] = {}

    def __call__(self) -> ColdStart | None:
        return self.cold_start(DEFAULT_MODEL)

    def served(self) -> Sequence[str]:
        self._recheck()
        return tuple(self._models)

    def cold_start(self, model: str) -> ColdStart | None:
        self._recheck()
        loaded = self._models.get(model)
        return None if loaded is None else loaded.cold_start

    def states(self) -> list[ModelState]:
        self._recheck()
        return [loaded.state for loaded in self._models.values()]

    def _recheck(self) -> None:
        now = self._monotonic()
        if now - self._checked_at >= self._recheck_s:
            self._checked_at = now
            self._reload()

    def _reload(self) -> None:
        try:
            names = served_models(self._root)
        except OSError as exc:  # keep serving what is loaded
            log.warning("event=registry_unreadable root=%s reason=%r", self._root, str(exc))
            return
        for name in self._models.keys() - set(names):
            log.info("event=model_retired model=%s", name)
        self._models = {name: self._load(name, self._models.get(name)) for name in names}

    def _load(self, name: str, previous: _Loaded | None) -> _Loaded:
        directory = model_root(self._root, name)
        version = current_version(directory)
        if previous is not None and (version is None or previous.version == version):
            return previous
        try:
            if version is None:
                raise RegistryError(f"model {name!r} has no CURRENT")
            artifact = load_artifact(directory, version)
            space, to_space = served_space(directory, artifact)
            cold = ColdStart.from_manifest(artifact.manifest, space, to_space)
        except (RegistryError, ValueError, OSError) as exc:
            log.warning(
                "event=cold_start_unreadable model=%s version=%s reason=%r", name, version, str(exc)
            )
            if previous is not None:
                return _Loaded(None, previous.cold_start, previous.state)
            return _Loaded(None, None, ModelState(name, version))
        manifest = artifact.manifest
        log.info("event=cold_start_loaded model=%s version=%s space=%s", name, version, space)
        state = ModelState(
            name, version, space, manifest.output_dim, manifest.input_schema_hash, True
        )
        return _Loaded(version, cold, state)
