"""The default model of the embedded demo: a trained SUM artifact committed to the repo.

A committed artifact (about 2 MB) rather than training at first use: the demo
starts in a second, needs no torch, and serves the same model on every machine.
It is reproduced by ``make default-model`` (see docs/model.md); loading it checks
its sha256 like any other version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from models.registry import ModelArtifact, current_version, install, load_artifact

log = logging.getLogger(__name__)

DEFAULT_REGISTRY: Final = Path(__file__).parent / "artifacts"
DEFAULT_VERSION: Final = "sum-default-1"


def ensure_default_model(registry: Path, history_length: int) -> ModelArtifact:
    """The registry's CURRENT model; when the registry is empty, install the default first.

    ``history_length`` is the number of events the feature states keep; the default
    model reads its own schema's L (from its manifest), so a different value only
    means a shorter or a padded history, and is logged.
    """
    if current_version(registry) is not None:
        return load_artifact(registry)
    default = load_artifact(DEFAULT_REGISTRY, DEFAULT_VERSION)
    if default.manifest.schema.history_length != history_length:
        log.warning(
            "event=default_model_history_mismatch model_l=%d feature_l=%d",
            default.manifest.schema.history_length,
            history_length,
        )
    log.info(
        "event=registry_empty action=install_default version=%s path=%s", DEFAULT_VERSION, registry
    )
    return install(registry, default)
