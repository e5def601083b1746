"""The prediction log in Redis (the local stack's embedded default): a capped Stream plus
per-id keys for the feedback join.

Keys (prefix `canary:predlog`, setting `prediction_log_key`):

| key | type | holds |
|---|---|---|
| `<prefix>:stream` | Stream, `XADD MAXLEN ~ cap` | one entry per row; every field a string: numbers as text, lists as JSON, `shadow` 0/1, `input_b64` empty when off |
| `<prefix>:req:<request id>` | string, EX label window | JSON `{"model", "model_version", "slot", "classes"}` of the prediction (not of shadow copies) |
| `<prefix>:label:<request id>` | string, EX label window | the label, a JSON list of classes: a second post of it is a duplicate |
| `<prefix>:tally:<model>` | hash | `<version>:labels` and `<version>:correct`: labelled rows and correct rows |

Stream entry ids are Redis' clock in milliseconds, so a time range is one `XRANGE`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.core.feedback import JudgedLabel, LoggedPrediction, Tally

_LIST_FIELDS = ("classes", "confidences", "input_shape")
_PAGE = 1000
_CLOCK_MARGIN_S = 60.0  # a row's time is the slot's clock; its entry id Redis' a little later
# Store a label once: SET NX (idempotent), then count it in the tally, atomically.
_ADD_LABEL = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':labels', ARGV[4])
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':correct', ARGV[5])
  return 1
end
return 0
"""


def to_fields(row: dict[str, Any]) -> dict[str, str]:
    """A row as Stream fields (all strings)."""
    fields = {}
    for name, value in row.items():
        if name in _LIST_FIELDS:
            fields[name] = json.dumps(value, separators=(",", ":"))
        elif isinstance(value, bool):
            fields[name] = "1" if value else "0"
        else:
            fields[name] = "" if value is None else str(value)
    return fields


def from_fields(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """Inverse of `to_fields`."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    row: dict[str, Any] = dict(text)
    for name in _LIST_FIELDS:
        if name in text:
            row[name] = json.loads(text[name])
    row["time"] = float(text.get("time") or 0)
    row["rows"] = int(text.get("rows") or 0)
    row["latency_ms"] = float(text.get("latency_ms") or 0)
    row["shadow"] = text.get("shadow") == "1"
    row["input_b64"] = text.get("input_b64") or None
    return row


class RedisPredictionStore:
    """`PredictionLogStore` on Redis. Calls raise `redis.RedisError` on a fault (the log's
    writer counts the batch as dropped; the feedback desk answers 503)."""

    def __init__(
        self, url: str, *, password: str | None = None, max_len: int = 100_000, label_window_s: int = 86_400,
        timeout_s: float = 1.0, key_prefix: str = "canary:predlog",
    ) -> None:  # fmt: skip
        if max_len < 1 or label_window_s < 1:
            raise ValueError("max_len and label_window_s must be at least 1")
        self.max_len, self.label_window_s, self.prefix = max_len, label_window_s, key_prefix
        self.stream = f"{key_prefix}:stream"
        self._client = redis.Redis.from_url(
            url, password=password, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        self._add_label = self._client.register_script(_ADD_LABEL)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    # -- sink ----------------------------------------------------------------------------
    def write(self, rows: list[dict[str, Any]]) -> None:
        """One pipeline per batch: XADD each row (trimming the stream to about `max_len`)
        and index each non-shadow row by its request id for the label window."""
        pipe = self._client.pipeline(transaction=False)
        for row in rows:
            pipe.xadd(self.stream, to_fields(row), maxlen=self.max_len, approximate=True)  # type: ignore[arg-type]
            if not row["shadow"]:
                joined = {k: row[k] for k in ("model", "model_version", "slot", "classes", "confidences", "latency_ms")}
                pipe.set(self._key("req", row["request_id"]), json.dumps(joined), ex=self.label_window_s)
        pipe.execute()

    def close(self) -> None:
        self._client.close()

    # -- the feedback join ---------------------------------------------------------------
    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]:
        found = {}
        for request_id, blob in zip(ids, self._client.mget([self._key("req", i) for i in ids]), strict=True):
            if blob is None:
                continue
            entry = json.loads(blob)
            if entry["model"] == model:
                found[request_id] = LoggedPrediction(
                    entry["model"], entry["model_version"], entry["slot"], tuple(entry["classes"]),
                    tuple(entry.get("confidences") or ()), entry.get("latency_ms"),
                )  # fmt: skip
        return found

    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]:
        blobs = self._client.mget([self._key("label", i) for i in ids])
        return {i: tuple(json.loads(b)) for i, b in zip(ids, blobs, strict=True) if b is not None}

    def add_labels(self, labels: list[JudgedLabel]) -> int:
        pipe = self._client.pipeline(transaction=False)
        for label in labels:
            self._add_label(
                keys=[self._key("label", label.request_id), self._key("tally", label.model)],
                args=[json.dumps(list(label.values)), self.label_window_s, label.model_version, len(label.values),
                      label.correct],
                client=pipe,
            )  # fmt: skip
        return sum(int(added) for added in pipe.execute())

    def tallies(self, model: str) -> dict[str, Tally]:
        counts: dict[str, dict[str, int]] = {}
        raw: dict[bytes, bytes] = self._client.hgetall(self._key("tally", model))  # type: ignore[assignment]
        for field, value in raw.items():
            version, _, kind = field.decode().rpartition(":")
            counts.setdefault(version, {})[kind] = int(value)
        return {v: Tally(c.get("labels", 0), c.get("correct", 0)) for v, c in sorted(counts.items())}

    # -- export --------------------------------------------------------------------------
    def read_range(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        """Rows whose `time` lies in [since, until), oldest first, a page at a time."""
        start = f"{max(0, int((since - _CLOCK_MARGIN_S) * 1000))}-0"
        end = f"{int((until + _CLOCK_MARGIN_S) * 1000)}"
        while True:
            page: list[tuple[bytes, dict[bytes, bytes]]] = self._client.xrange(  # type: ignore[assignment]
                self.stream, min=start, max=end, count=_PAGE
            )
            for _entry_id, fields in page:
                row = from_fields(fields)
                if since <= row["time"] < until:
                    yield row
            if len(page) < _PAGE:
                return
            last = page[-1][0].decode()
            start = "(" + last  # exclusive: the next page starts after it
