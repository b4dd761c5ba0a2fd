"""Real event logs (Parquet or JSON Lines, one event per row) in the service's contract.

Each row is validated by the service's own ``convert_event``: a bad row is an
error naming its line, not a silently different training set.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from service.core.events import Event, EventRejected, convert_event

# Logs are history: only the lower bound on ts matters, not 'now'.
_FAR_FUTURE_MS = 2**62


def load_events(path: Path) -> list[Event]:
    """All events of a ``.parquet`` or ``.jsonl``/``.ndjson`` file, validated."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: list[object] = pq.read_table(path).to_pylist()
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open("rb") as handle:
            rows = []
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(msgspec.json.decode(line))
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
    else:
        raise ValueError(f"{path}: unknown log format {suffix!r}: use .parquet or .jsonl")
    events = []
    for number, row in enumerate(rows, 1):
        if isinstance(row, dict):
            row = {k: v for k, v in row.items() if v is not None}
        try:
            events.append(convert_event(row, _FAR_FUTURE_MS))
        except EventRejected as exc:
            raise ValueError(f"{path}: row {number}: {exc.reason}") from None
    return events


def write_jsonl(events: list[Event], path: Path) -> None:
    """The inverse of :func:`load_events` for JSON Lines (handy for exporting the world)."""
    with path.open("wb") as handle:
        for event in events:
            handle.write(msgspec.json.encode(event) + b"\n")
