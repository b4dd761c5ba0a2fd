"""The cold-start embedding served for users without a record, following the registry."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.registry import Manifest, RegistryError, current_version, load_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ColdStart:
    vector: npt.NDArray[np.float32]
    model_version: str

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ColdStart:
        vector = np.asarray(manifest.cold_start_embedding, dtype=np.float32)
        return cls(vector=vector, model_version=manifest.version)


class RegistryColdStart:
    """Reads CURRENT's manifest, re-checking at most every ``recheck_s`` seconds.

    Only the small manifest is read (the API never loads the model). If the registry
    becomes unreadable, the last good cold start keeps being served.
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
            self._current = ColdStart.from_manifest(load_manifest(self._root, version))
            log.info("event=cold_start_loaded version=%s", version)
        except RegistryError as exc:
            log.warning("event=cold_start_unreadable version=%s reason=%r", version, str(exc))
