"""The options both clients share, checked once when the client is made."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from userembed.batching import DEFAULT_MAX_BATCH
from userembed.errors import InvalidRequest
from userembed.results import DEFAULT_MODEL
from userembed.retry import RetryPolicy
from userembed.transport import Precision, Query

# models.registry's version names and service.core.model_names' model names (the server
# answers 400 to anything else)
_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MODEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """See :class:`userembed.Client` for what each option means."""

    api_key: str | None = None
    model: str | None = None
    model_version: str | None = None
    timeout: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_batch: int = DEFAULT_MAX_BATCH
    precision: Precision = "float16"
    hedge_after_s: float | None = None
    hedge_budget: float = 0.1
    max_connections: int = 32
    coalesce_window_s: float | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout={self.timeout}: a deadline in seconds, > 0")
        if self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch}: the server's batch_get_max_ids, >= 1")
        if self.precision not in ("float16", "float32"):
            raise ValueError(f"precision={self.precision!r}: 'float16' or 'float32'")
        if self.hedge_after_s is not None and self.hedge_after_s < 0:
            raise ValueError(f"hedge_after_s={self.hedge_after_s}: >= 0 seconds, or None (off)")
        if not 0 <= self.hedge_budget <= 1:
            raise ValueError(f"hedge_budget={self.hedge_budget}: a share of calls, 0..1")
        if self.coalesce_window_s is not None and self.coalesce_window_s < 0:
            raise ValueError(
                f"coalesce_window_s={self.coalesce_window_s}: >= 0 seconds, or None (off)"
            )
        if self.max_connections < 1:
            raise ValueError(f"max_connections={self.max_connections}: at least 1")
        if self.model_version is not None and not _VERSION.fullmatch(self.model_version):
            raise ValueError(
                f"model_version={self.model_version!r}: a model version name, 1..64 of "
                "[A-Za-z0-9_.-] starting with a letter or digit"
            )
        if self.model is not None and not _MODEL.fullmatch(self.model):
            raise ValueError(
                f"model={self.model!r}: a model name, 1..32 of [A-Za-z0-9_-] starting with a "
                "letter or digit"
            )

    def query(self, model: str | None, model_version: str | None) -> Query:
        """What a one-model call reads: ``model`` (else the client's; neither: the default
        model, unnamed), pinned to ``model_version``, else to the client's pin when it
        reads the client's model."""
        name = model or self.model
        own = (name or DEFAULT_MODEL) == (self.model or DEFAULT_MODEL)
        pin = model_version or (self.model_version if own else None)
        if name is None:
            return Query.of((), {DEFAULT_MODEL: pin})
        return Query.of((name,), {name: pin})

    def batch_query(
        self,
        model: str | None,
        model_version: str | None,
        models: Sequence[str] | None,
        model_versions: Mapping[str, str] | None,
    ) -> Query:
        """What a ``get_many`` reads: one model (``model``, ``model_version``) or several
        (``models``, ``model_versions``), not a mix."""
        if models is None:
            if model_versions is not None:
                raise ValueError(
                    "model_versions= pins the models of models=[...]: use model_version="
                )
            return self.query(model, model_version)
        if model is not None or model_version is not None:
            raise ValueError("models=[...] reads several models: pin them with model_versions=")
        return self.models_query(models, model_versions)

    def models_query(
        self, models: Sequence[str], model_versions: Mapping[str, str] | None
    ) -> Query:
        """What a call naming ``models`` reads: each pinned by ``model_versions``, and the
        client's model, if among them and not pinned there, by the client's pin."""
        if isinstance(models, str) or not models:
            raise InvalidRequest(
                f"models={models!r}: a non-empty list of model names (or use model=)",
                code="invalid_request",
            )
        pins: dict[str, str | None] = dict(model_versions or {})
        own = self.model or DEFAULT_MODEL
        if own in models and not pins.get(own):
            pins[own] = self.model_version
        return Query.of(models, pins)
