"""The predictions file: one schema for both engines, written to a temporary file beside the
target and renamed over it only when every row is in, so a failed run leaves nothing behind.

Columns: `class` (int64), `confidence` (float32), with `--logits` the graph's raw scores
(`logits`, or `probabilities` for scikit-learn models: a list column in Parquet, `logits_0`..
columns in CSV), then `model_version` and `model_sha256`. Parquet files also carry the
lineage in their file metadata (`canary.*` keys).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from models.errors import CanaryError
from models.score_model import Predictions

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class OutputError(CanaryError):
    """The predictions cannot be written where asked."""


@dataclass(frozen=True)
class OutputSpec:
    """What goes into the predictions file besides the predictions."""

    path: Path
    model_version: str
    model_sha256: str
    scores_name: str  # the graph's scores output: "logits" or "probabilities"
    scores_width: int
    logits: bool = False  # write the raw scores too
    metadata: dict[str, str] = field(default_factory=dict)  # lineage, as Parquet file metadata

    @property
    def format(self) -> str:
        return _format(self.path)

    @cached_property
    def schema(self) -> pa.Schema:
        fields = [pa.field("class", pa.int64()), pa.field("confidence", pa.float32())]
        if self.logits and self.format == "parquet":
            fields.append(pa.field(self.scores_name, pa.list_(pa.float32(), self.scores_width)))
        elif self.logits:
            fields += [pa.field(f"{self.scores_name}_{i}", pa.float32()) for i in range(self.scores_width)]
        fields += [pa.field("model_version", pa.string()), pa.field("model_sha256", pa.string())]
        return pa.schema(fields, metadata=self.metadata if self.format == "parquet" else None)

    def to_batch(self, predictions: Predictions) -> pa.RecordBatch:
        n = len(predictions)
        columns: list[pa.Array] = [pa.array(predictions.classes), pa.array(predictions.confidences)]
        if self.logits:
            scores = predictions.scores.reshape(n, self.scores_width)
            if self.format == "parquet":
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), self.scores_width))
            else:
                columns += [pa.array(scores[:, i]) for i in range(self.scores_width)]
        columns += [_repeat(self.model_version, n), _repeat(self.model_sha256, n)]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)


class OutputFile:
    """`with OutputFile(spec) as out: out.write(p); ...; out.commit()`: without `commit()`
    (an error on the way), the temporary file is removed and `spec.path` is untouched."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec
        self.rows = 0
        self._temp: Path | None = None
        self._writer: Any = None  # pyarrow's ParquetWriter or CSVWriter

    def __enter__(self) -> OutputFile:
        spec, target = self.spec, self.spec.path
        fmt = check_target(target)
        try:
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        except OSError as exc:
            raise OutputError(f"--output {target}: cannot write in {target.parent} ({exc.strerror})") from None
        os.close(handle)
        self._temp = Path(name)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(self._temp, spec.schema, compression="zstd")
        else:
            import pyarrow.csv as pacsv

            self._writer = pacsv.CSVWriter(str(self._temp), spec.schema)
        return self

    def write(self, predictions: Predictions) -> None:
        if len(predictions):
            self._writer.write_batch(self.spec.to_batch(predictions))
            self.rows += len(predictions)

    def commit(self) -> None:
        """Close the file and move it over the target in one rename."""
        assert self._temp is not None
        self._writer.close()
        self._writer = None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._temp, 0o666 & ~umask)  # mkstemp made it private; the result is an ordinary file
        os.replace(self._temp, self.spec.path)
        self._temp = None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._writer.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)


def check_target(target: Path) -> str:
    """The output's format, or OutputError when it cannot be a predictions file."""
    if target.is_dir():
        raise OutputError(f"--output {target} is a folder; give a file name ending in .parquet or .csv")
    if not target.parent.is_dir():
        raise OutputError(f"--output {target}: folder {target.parent} does not exist")
    return _format(target)


def _format(target: Path) -> str:
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise OutputError(f"--output {target} must end in .parquet or .csv")
    return fmt


def _repeat(text: str, n: int) -> pa.Array:
    """`text` n times, built without n Python objects."""
    return pa.DictionaryArray.from_arrays(np.zeros(n, dtype=np.int32), [text]).dictionary_decode()
