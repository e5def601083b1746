"""The prediction log in PostgreSQL (production): rows by COPY in batches, labels joined by SQL.

Tables (created on first connect, under an advisory lock so slots starting together agree):

- `canary_predictions`: one row per prediction, the documented columns (`time` timestamptz,
  `classes` integer[], `confidences` real[], `input_shape` integer[]), indexed on
  `request_id` and `time`. Retention is the operator's (e.g. delete or detach by `time`).
- `canary_labels`: one row per labelled request id (primary key: a label is stored once),
  with the model version and slot that predicted, the labels and the correct-row count.

A connection per role: the log's writer thread has its own; feedback and export share
another behind a lock. A failed call drops its connection; the next call reconnects.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from service.core.feedback import JudgedLabel, LoggedPrediction, Tally

COLUMNS = (
    "request_id", "time", "slot", "model", "model_version", "protocol", "shadow", "rows", "classes",
    "confidences", "latency_ms", "input_datatype", "input_shape", "input_sha256", "input_b64",
)  # fmt: skip
SCHEMA = """
CREATE TABLE IF NOT EXISTS canary_predictions (
    request_id text NOT NULL,
    time timestamptz NOT NULL,
    slot text NOT NULL,
    model text NOT NULL,
    model_version text NOT NULL,
    protocol text NOT NULL,
    shadow boolean NOT NULL,
    rows integer NOT NULL,
    classes integer[] NOT NULL,
    confidences real[] NOT NULL,
    latency_ms real NOT NULL,
    input_datatype text NOT NULL,
    input_shape integer[] NOT NULL,
    input_sha256 text NOT NULL,
    input_b64 text
);
CREATE INDEX IF NOT EXISTS canary_predictions_request_id ON canary_predictions (request_id);
CREATE INDEX IF NOT EXISTS canary_predictions_time ON canary_predictions (time);
CREATE TABLE IF NOT EXISTS canary_labels (
    request_id text PRIMARY KEY,
    model text NOT NULL,
    model_version text NOT NULL,
    slot text NOT NULL,
    labels integer[] NOT NULL,
    rows integer NOT NULL,
    correct integer NOT NULL,
    time timestamptz NOT NULL DEFAULT now()
);
"""
_COLUMN_LIST = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
_COPY = sql.SQL("COPY canary_predictions ({}) FROM STDIN").format(_COLUMN_LIST)
_PAGE_QUERY = sql.SQL(
    "SELECT {} FROM canary_predictions WHERE (time, request_id) > (%s, %s) AND time < %s "
    "ORDER BY time, request_id LIMIT %s"
).format(_COLUMN_LIST)
_SCHEMA_LOCK = 0x63616E61  # advisory lock id ("cana")
_PAGE = 1000


class PostgresPredictionStore:
    """`PredictionLogStore` on PostgreSQL. Calls raise `psycopg.Error` on a fault."""

    def __init__(self, url: str, *, password: str | None = None, label_window_s: int = 86_400,
                 timeout_s: float = 1.0) -> None:  # fmt: skip
        if label_window_s < 1:
            raise ValueError("label_window_s must be at least 1")
        self.url, self._password, self.label_window_s = url, password, label_window_s
        self.timeout_s = timeout_s
        self._writer: psycopg.Connection | None = None
        self._reader: psycopg.Connection | None = None
        self._reader_lock = threading.Lock()

    def _connect(self) -> psycopg.Connection:
        extra: dict[str, Any] = {"password": self._password} if self._password else {}
        conn = psycopg.connect(
            self.url, autocommit=True, connect_timeout=max(2, math.ceil(self.timeout_s)),
            options=f"-c statement_timeout={int(self.timeout_s * 1000)}", **extra,
        )  # fmt: skip
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(SCHEMA)  # type: ignore[arg-type]
        except BaseException:
            conn.close()
            raise
        return conn

    def _query(self, query: str | sql.Composed, params: tuple = ()) -> list[tuple]:
        with self._reader_lock:
            try:
                if self._reader is None or self._reader.closed:
                    self._reader = self._connect()
                return self._reader.execute(query, params).fetchall()  # type: ignore[arg-type]
            except BaseException:
                self._drop("_reader")
                raise

    def _drop(self, role: str) -> None:
        conn = getattr(self, role)
        setattr(self, role, None)
        if conn is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                conn.close()

    # -- sink (writer thread only) -------------------------------------------------------
    def write(self, rows: list[dict[str, Any]]) -> None:
        """One COPY per batch, in one transaction: a batch is stored whole or not at all."""
        try:
            if self._writer is None or self._writer.closed:
                self._writer = self._connect()
            with self._writer.transaction(), self._writer.cursor() as cursor:
                with cursor.copy(_COPY) as copy:
                    for row in rows:
                        values = dict(row, time=datetime.fromtimestamp(row["time"], UTC))
                        copy.write_row([values[c] for c in COLUMNS])
        except BaseException:
            self._drop("_writer")
            raise

    def close(self) -> None:
        self._drop("_writer")
        with self._reader_lock:
            self._drop("_reader")

    # -- the feedback join ---------------------------------------------------------------
    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]:
        found = self._query(
            "SELECT DISTINCT ON (request_id) request_id, model, model_version, slot, classes, confidences, latency_ms "
            "FROM canary_predictions "
            "WHERE request_id = ANY(%s) AND model = %s AND NOT shadow "
            "AND time > now() - make_interval(secs => %s) ORDER BY request_id, time DESC",
            (ids, model, self.label_window_s),
        )
        return {r[0]: LoggedPrediction(r[1], r[2], r[3], tuple(r[4]), tuple(r[5] or ()), r[6]) for r in found}

    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]:
        found = self._query("SELECT request_id, labels FROM canary_labels WHERE request_id = ANY(%s)", (ids,))
        return {r[0]: tuple(r[1]) for r in found}

    def add_labels(self, labels: list[JudgedLabel]) -> int:
        params = [(j.request_id, j.model, j.model_version, j.slot, list(j.values), len(j.values), j.correct)
                  for j in labels]  # fmt: skip
        with self._reader_lock:
            try:
                if self._reader is None or self._reader.closed:
                    self._reader = self._connect()
                with self._reader.transaction(), self._reader.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO canary_labels (request_id, model, model_version, slot, labels, rows, correct) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING",
                        params,
                    )
                    return max(cursor.rowcount, 0)
            except BaseException:
                self._drop("_reader")
                raise

    def tallies(self, model: str) -> dict[str, Tally]:
        found = self._query(
            "SELECT model_version, sum(rows), sum(correct) FROM canary_labels WHERE model = %s GROUP BY model_version "
            "ORDER BY model_version",
            (model,),
        )
        return {r[0]: Tally(int(r[1]), int(r[2])) for r in found}

    # -- export --------------------------------------------------------------------------
    def read_range(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        """Rows whose `time` lies in [since, until), oldest first, a page at a time (keyset
        pagination on time and request id)."""
        last: tuple[datetime, str] = (datetime.fromtimestamp(since, UTC), "")
        end = datetime.fromtimestamp(until, UTC)
        while True:
            page = self._query(_PAGE_QUERY, (*last, end, _PAGE))
            for values in page:
                row = dict(zip(COLUMNS, values, strict=True))
                row["time"] = row["time"].timestamp()
                yield row
            if len(page) < _PAGE:
                return
            last = (page[-1][1], page[-1][0])
