"""The cold-start embedding served for users without a record, following the registry."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.registry import (
    Manifest,
    RegistryError,
    current_version,
    load_artifact,
    served_space,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ColdStart:
    """The model's embedding for a user with no history, expressed in ``space_version``
    (the space the worker writes records in), so a pinned reader can compare spaces."""

    vector: npt.NDArray[np.float32]
    model_version: str
    space_version: str = ""

    def __post_init__(self) -> None:
        if not self.space_version:
            object.__setattr__(self, "space_version", self.model_version)

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


class RegistryColdStart:
    """Follows CURRENT, re-checking at most every ``recheck_s`` seconds.

    The API never runs the model: on a new version it verifies the artifact once and
    maps the manifest's cold-start embedding into the version's served space (its
    alignment chain), as the worker does for real embeddings. If the registry becomes
    unreadable, the last good cold start keeps being served.
    """

    def __init__(self, root: Path, recheck_s: float = 5.0) -> None:
        self._root = root
        self._recheck_s = recheck_s
        self._checked_at = float("-inf")
        self._current: ColdStart | None = None

    def __call__(self) -> ColdStart | None:
        if time.monotonic() - self._checked_at >= self._recheck_s:
            self._checked_at = time.monotonic()
            self._reload()
        return self._current

    def _reload(self) -> None:
        version = current_version(self._root)
        if version is None or (self._current and self._current.model_version == version):
            return
        try:
            artifact = load_artifact(self._root, version)
            space, to_space = served_space(self._root, artifact)
            self._current = ColdStart.from_manifest(artifact.manifest, space, to_space)
            log.info("event=cold_start_loaded version=%s space=%s", version, space)
        except (RegistryError, ValueError, OSError) as exc:
            log.warning("event=cold_start_unreadable version=%s reason=%r", version, str(exc))
