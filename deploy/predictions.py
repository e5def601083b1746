"""`canary predictions`: a time range of the prediction log, exported to Parquet or CSV.

Reads the stack's log store (its Redis, or the store `--from` names: `postgresql://...` in
production), keeps the rows of the window (optionally one slot or one model version), joins
the labels posted through feedback, and writes one file. Columns: the log's row fields
(`service/core/predlog.py`) plus `labels` (the posted label per row, or empty). In CSV, list
columns are JSON text (`[3]`) and `time` is ISO 8601 UTC; in Parquet they are lists and a
UTC timestamp.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.errors import CanaryError

COLUMNS = (
    "request_id", "time", "slot", "model", "model_version", "protocol", "shadow", "rows", "classes",
    "confidences", "latency_ms", "input_datatype", "input_shape", "input_sha256", "input_b64", "labels",
)  # fmt: skip
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CHUNK = 5000  # rows per label lookup and per written batch


def parse_when(text: str, now: float) -> float:
    """`1h`/`30m`/`2d`/`90s` ago, `now`, or an ISO 8601 time (UTC when it names no zone) ->
    Unix seconds. CanaryError otherwise."""
    value = text.strip().lower()
    if value == "now":
        return now
    if match := _AGO.match(value):
        return now - float(match[1]) * _UNIT_S[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CanaryError(f"time {text!r} must be like 1h, 30m, 2d (ago), now, or 2026-01-31T12:00:00") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def parse_window(since: str, until: str) -> tuple[float, float]:
    """`--since`/`--until` -> Unix seconds [start, end); CanaryError for an empty window."""
    now = time.time()
    start, end = parse_when(since, now), parse_when(until, now)
    if end <= start:
        raise CanaryError("the window is empty: --until must come after --since")
    return start, end


@dataclass(frozen=True)
class ExportResult:
    path: Path
    rows: int
    labelled: int
    since: float
    until: float


def _chunks(rows: Iterator[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("request_id", pa.string()), ("time", pa.timestamp("us", tz="UTC")), ("slot", pa.string()),
        ("model", pa.string()), ("model_version", pa.string()), ("protocol", pa.string()), ("shadow", pa.bool_()),
        ("rows", pa.int32()), ("classes", pa.list_(pa.int32())), ("confidences", pa.list_(pa.float32())),
        ("latency_ms", pa.float32()), ("input_datatype", pa.string()), ("input_shape", pa.list_(pa.int32())),
        ("input_sha256", pa.string()), ("input_b64", pa.string()), ("labels", pa.list_(pa.int32())),
    ])  # fmt: skip


def _table(chunk: list[dict[str, Any]], csv: bool):
    import pyarrow as pa

    columns: dict[str, list[Any]] = {name: [row.get(name) for row in chunk] for name in COLUMNS}
    columns["time"] = [datetime.fromtimestamp(t, UTC) for t in columns["time"]]
    table = pa.Table.from_pydict(columns, schema=_schema())
    if not csv:
        return table
    # CSV has no lists: JSON text, which any reader (and pandas) can parse back
    for name in ("classes", "confidences", "input_shape", "labels"):
        texts = [None if v is None else json.dumps(v, separators=(",", ":")) for v in columns[name]]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(texts, pa.string()))
    return table


def export_predictions(
    store: Any, output: Path, since: float, until: float, *, slot: str | None = None, version: str | None = None,
) -> ExportResult:  # fmt: skip
    """Write the log's rows with `time` in [since, until) (and the given slot / version) to
    `output` (.parquet or .csv), labels joined. Raises CanaryError for a bad window or format;
    the store's own errors (unreachable) are the caller's to word."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = output.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise CanaryError(f"--output must end in .parquet or .csv, got {output.name!r}")
    if until <= since:
        raise CanaryError("the window is empty: --until must come after --since")
    output.parent.mkdir(parents=True, exist_ok=True)
    csv = suffix == ".csv"
    rows = (
        row for row in store.read_range(since, until)
        if (slot is None or row["slot"] == slot) and (version is None or row["model_version"] == version)
    )  # fmt: skip
    count = labelled = 0
    tmp = output.with_name(output.name + ".partial")
    writer: Any = None
    try:
        for chunk in _chunks(rows):
            labels = store.labels_of([row["request_id"] for row in chunk if not row["shadow"]])
            for row in chunk:
                label = None if row["shadow"] else labels.get(row["request_id"])
                row["labels"] = None if label is None else list(label)
            labelled += sum(1 for row in chunk if row["labels"] is not None)
            table = _table(chunk, csv)
            if writer is None:
                writer = pacsv.CSVWriter(tmp, table.schema) if csv else pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            count += len(chunk)
        if writer is None:  # no rows: still a file with the columns, so scripts need no special case
            table = _table([], csv)
            writer = pacsv.CSVWriter(tmp, table.schema) if csv else pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        writer.close()
        writer = None
        tmp.replace(output)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return ExportResult(output, count, labelled, since, until)


def online_accuracy(store: Any, model: str = "digits") -> dict[str, dict[str, Any]]:
    """Per model version: labelled rows and the share predicted right (from feedback)."""
    return {version: {"labels": t.labels, "accuracy": t.accuracy} for version, t in store.tallies(model).items()}


def open_log_store(home: Any, source: str | None) -> tuple[Any, str]:
    """The prediction log's store: `source` (a redis:// or postgresql:// URL) or the local
    stack's Redis; with the words that name it in an error (never a password)."""
    from service.sinks import open_store

    if not source:
        from deploy.stack import LocalStack

        return LocalStack(home).prediction_store(), "the local stack's Redis (is it up? `canary up`)"
    try:
        store = open_store(source, password=os.environ.get("CANARY_SERVICE_PREDICTION_LOG_PASSWORD") or None,
                           timeout_s=5.0)  # fmt: skip
    except ValueError as exc:
        raise CanaryError(f"--from: {exc}") from None
    return store, "--from " + source.split("@")[-1]


@contextmanager
def reading_log(where: str) -> Iterator[None]:
    """The store's own errors (unreachable, refused) as one CanaryError line."""
    import psycopg
    import redis

    try:
        yield
    except (redis.RedisError, psycopg.Error) as exc:
        raise CanaryError(f"cannot read the prediction log from {where}: {' '.join(str(exc).split())[:300]}") from None


def export_from(
    home: Any, source: str | None, output: str, since: str, until: str, slot: str | None, version: str | None
) -> ExportResult:
    """`canary predictions`: parse the window, open the store (`source`, else the local
    stack's), export. Every failure is one CanaryError line."""
    start, end = parse_window(since, until)
    store, where = open_log_store(home, source)
    try:
        with reading_log(where):
            return export_predictions(store, Path(output), start, end, slot=slot, version=version)
    except OSError as exc:
        raise CanaryError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        store.close()
