"""Where the prediction log goes: thin adapters that are both a `PredictionSink` (rows in
batches, from the log's writer thread) and a `PredictionStore` (the feedback join, label
tallies) over one database, plus a time-range reader for `canary predictions`.

- `redis://` (the stack's embedded default): `RedisPredictionStore`, a capped Redis Stream.
- `postgresql://` (production): `PostgresPredictionStore`, two tables, COPY in batches.

Kafka would suit a fleet whose predictions feed other consumers; it is documented as an
alternative (README), not built: the feedback join needs lookups by id, which a topic lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol
from urllib.parse import urlsplit

from service.core.feedback import JudgedLabel, LoggedPrediction, Tally


class PredictionLogStore(Protocol):
    """A sink, the feedback join's store and an exporter's reader, in one object."""

    def write(self, rows: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...
    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]: ...
    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]: ...
    def add_labels(self, labels: list[JudgedLabel]) -> int: ...
    def tallies(self, model: str) -> dict[str, Tally]: ...
    def read_range(self, since: float, until: float) -> Iterator[dict[str, Any]]: ...


REDIS_SCHEMES = ("redis", "rediss", "unix")
POSTGRES_SCHEMES = ("postgres", "postgresql")


def open_store(
    url: str, *, password: str | None = None, max_len: int = 100_000, label_window_s: int = 86_400,
    timeout_s: float = 1.0, key_prefix: str = "canary:predlog",
) -> PredictionLogStore:  # fmt: skip
    """The store for `url` (nothing connects yet); ValueError for any other scheme.

    `max_len` caps the Redis Stream (PostgreSQL keeps what its operator keeps); a prediction
    can be labelled for `label_window_s` after it was logged."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        from service.sinks.redis_stream import RedisPredictionStore

        return RedisPredictionStore(url, password=password, max_len=max_len, label_window_s=label_window_s,
                                    timeout_s=timeout_s, key_prefix=key_prefix)  # fmt: skip
    if scheme in POSTGRES_SCHEMES:
        try:
            from service.sinks.postgres import PostgresPredictionStore
        except ImportError:  # a Bento built without it: say so at start, not at the first write
            raise ValueError(
                "a postgresql:// prediction log needs psycopg, which is not installed here: "
                "add psycopg[binary] to the Bento's packages (bentofile.yaml)"
            ) from None

        return PostgresPredictionStore(url, password=password, label_window_s=label_window_s, timeout_s=timeout_s)
    raise ValueError(f"prediction log URL must be redis://... or postgresql://..., got scheme {scheme!r}")
