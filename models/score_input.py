"""Input files for batch scoring: which files, which columns, read in chunks with Arrow.

An input is one CSV or Parquet file or a folder of them (searched recursively, in name
order; names starting with `.` or `_`, such as Spark's `_SUCCESS`, are skipped). The card's
one input `input` of width 64 is taken either as 64 numeric columns `input_0`..`input_63` or
as one list column `input` of 64 numbers (Parquet only). Every file's schema is checked
before a row is scored; `to_features` then checks the values of each chunk (no missing
values, NaN or infinities, within the card's input range, as the served model demands) on
both engines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.errors import CanaryError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class InputError(CanaryError):
    """Input data the model cannot score: missing columns, wrong types, bad values."""


@dataclass(frozen=True)
class InputLayout:
    """How the card's one input is spread over columns."""

    name: str  # the card's input name, e.g. "input"
    width: int  # values per row, e.g. 64
    list_column: bool  # one list column `name`, else `name_0`..`name_{width-1}`

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.name,) if self.list_column else tuple(f"{self.name}_{i}" for i in range(self.width))

    def describe(self) -> str:
        return (
            f"{self.width} numeric columns {self.name}_0..{self.name}_{self.width - 1} "
            f"or one list column {self.name!r} of {self.width} numbers"
        )


@dataclass(frozen=True)
class InputSource:
    """Checked input files, all in one format and one layout."""

    root: Path
    files: tuple[Path, ...]
    format: str  # "parquet" or "csv"
    layout: InputLayout
    rows: int | None  # from the Parquet footers; None for CSV (unknown until read)
    header: tuple[str, ...] = ()  # a CSV input's columns, the same in every file

    def label(self, path: Path) -> str:
        return _label(self.root, path)

    def digest(self) -> str:
        """sha256 over every file's name (relative to the input) and bytes, in reading order."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(self.label(path).encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def batches(self, chunk_rows: int) -> Iterator[tuple[str, int, pa.RecordBatch]]:
        """(file label, index of the batch's first row in that file, batch of the layout's columns)."""
        for path in self.files:
            label, first = self.label(path), 0
            try:
                for batch in _read(path, self.format, self.layout, chunk_rows):
                    yield label, first, batch
                    first += batch.num_rows
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{label}: {_first_line(exc)}") from None


def open_input(path: Path, name: str, width: int) -> InputSource:
    """Find the files, pick the layout and check every file's columns and types."""
    files = _find_files(path)
    formats = {FORMATS[f.suffix.lower()] for f in files}
    if len(formats) > 1:
        raise InputError(f"--input {path} mixes CSV and Parquet files; score one format at a time")
    fmt = formats.pop()
    schemas = [(_label(path, f), _schema(f, fmt, _label(path, f))) for f in files]
    first = schemas[0][1]
    layout = InputLayout(name, width, list_column=name in first.names and _is_list(first.field(name).type))
    for label, schema in schemas:
        _check_schema(schema, layout, label)
        if fmt == "csv" and schema.names != first.names:
            raise InputError(f"{label} has other columns than {schemas[0][0]}; every CSV file needs the same header")
    rows = None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if rows == 0:
            raise InputError(f"--input {path} has no rows to score")
    return InputSource(path, tuple(files), fmt, layout, rows, tuple(first.names) if fmt == "csv" else ())


def to_features(
    batch: pa.RecordBatch, layout: InputLayout, value_range: tuple[float, float] | None, locate: Callable[[int], str]
) -> np.ndarray:
    """A batch's layout columns as float32 (rows, width), refused (InputError) on a value the
    served model would refuse. `locate(i)` names row i of the batch in messages."""
    n, width = batch.num_rows, layout.width
    if layout.list_column:
        column = batch.column(layout.name)
        lengths = _list_lengths(column, width)
        if (lengths != width).any():
            row = int(np.argmax(lengths != width))
            raise InputError(f"{locate(row)}: {layout.name} has {lengths[row]} values; the model takes {width}")
        values = column.flatten().to_numpy(zero_copy_only=False)
        features = np.asarray(values, dtype=np.float32).reshape(n, width)
    else:
        features = np.empty((n, width), dtype=np.float32)
        for j, name in enumerate(layout.columns):
            features[:, j] = batch.column(name).to_numpy(zero_copy_only=False)  # nulls arrive as NaN
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = _first(bad)
        raise InputError(f"{locate(row)}: {_column(layout, col)} is missing, NaN or infinite")
    if value_range is not None:
        low, high = value_range
        bad = (features < low) | (features > high)
        if bad.any():
            row, col = _first(bad)
            raise InputError(
                f"{locate(row)}: {_column(layout, col)} is {features[row, col]:g}; "
                f"the model takes values in [{low:g}, {high:g}]"
            )
    return features


def _find_files(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(f"--input {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise InputError(f"--input {path} is not a .csv or .parquet file")
        return [path]
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.suffix.lower() in FORMATS
        and not any(part.startswith((".", "_")) for part in f.relative_to(path).parts)
    )
    if not files:
        raise InputError(f"--input {path} holds no .csv or .parquet files")
    return files


def _label(root: Path, path: Path) -> str:
    """A file's name in messages and in the input digest: relative to the input folder."""
    return path.name if path == root else str(path.relative_to(root))


def _schema(path: Path, fmt: str, label: str) -> pa.Schema:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(path)
        import pyarrow.csv as pacsv

        with pacsv.open_csv(path) as reader:  # types inferred from the first block
            return reader.schema
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{label} is not a readable {fmt.upper()} file: {_first_line(exc)}") from None


def _check_schema(schema: pa.Schema, layout: InputLayout, label: str) -> None:
    missing = [c for c in layout.columns if c not in schema.names]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(
            f"{label}: missing column(s) {', '.join(missing[:3])}{more}; the model takes {layout.describe()}"
        )
    for name in layout.columns:
        kind = schema.field(name).type
        if layout.list_column:
            if not _is_list(kind) or not _numeric(kind.value_type):
                raise InputError(f"{label}: column {name!r} is {kind}; it must be a list of {layout.width} numbers")
            if pa.types.is_fixed_size_list(kind) and kind.list_size != layout.width:
                raise InputError(
                    f"{label}: column {name!r} holds {kind.list_size} values; the model takes {layout.width}"
                )
        elif not _numeric(kind):
            raise InputError(f"{label}: column {name!r} is {kind}; it must hold numbers")


def _read(path: Path, fmt: str, layout: InputLayout, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=list(layout.columns))
        return
    import pyarrow.csv as pacsv

    # ~5 bytes of text per value ("16.0,"): blocks of about chunk_rows rows
    block = min(max(chunk_rows * layout.width * 5, 1 << 20), 256 << 20)
    convert = pacsv.ConvertOptions(
        include_columns=list(layout.columns), column_types=dict.fromkeys(layout.columns, pa.float32())
    )
    with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block), convert_options=convert) as reader:
        yield from reader


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)


def _list_lengths(column: pa.Array, width: int) -> np.ndarray:
    import pyarrow.compute as pc

    if pa.types.is_fixed_size_list(column.type) and not column.null_count:
        return np.full(len(column), column.type.list_size)
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)


def _first(bad: np.ndarray) -> tuple[int, int]:
    row = int(np.argmax(bad.any(axis=1)))
    return row, int(np.argmax(bad[row]))


def _column(layout: InputLayout, index: int) -> str:
    return f"{layout.name}[{index}]" if layout.list_column else layout.columns[index]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
