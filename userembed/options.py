"""The options both clients share, checked once when the client is made."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from userembed.batching import DEFAULT_MAX_BATCH
from userembed.retry import RetryPolicy
from userembed.transport import Precision

# models.registry's version names (the server answers 400 to anything else)
_VERSION: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """See :class:`userembed.Client` for what each option means."""

    api_key: str | None = None
    model_version: str | None = None
    timeout: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_batch: int = DEFAULT_MAX_BATCH
    precision: Precision = "float16"
    hedge_after_s: float | None = None
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
