"""The Spark engine: the same checks and the same `predict` as the local engine, run as an
Arrow UDF (`mapInArrow`) on every partition, with the ONNX file shipped to the executors.

Spark reads the files; each row carries its place in the input (file, split, position),
the scored rows are sorted back into input order and written as part files in a scratch
folder beside the output, which the driver then streams into the one output file. The
executors load the shipped file through the service's `OnnxRunner`, which hashes the bytes it
loads against the card: a file changed on the way is refused there too.

`local[*]` runs on this machine; any other master URL needs this package (and onnxruntime)
installed on the executors and the input and output on a file system they share.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa

from models.errors import CanaryError
from models.score_input import InputError, InputLayout, InputSource, to_features
from models.score_model import Predictions, ScoringModel, open_runner, predict
from service.core.model import ModelCard
from service.core.runner import OnnxRunner

KEYS = ("_file", "_block", "_seq")  # a row's place in the input: file index, split start, position
SCORED_SCHEMA = "class long, confidence float, scores array<float>, _file int, _block long, _seq long"


@dataclass(frozen=True)
class SparkOptions:
    master: str = "local[*]"
    driver_memory: str = "1g"
    chunk_rows: int = 65_536  # rows per Arrow batch handed to the UDF
    java_options: str = ""  # spark.driver.extraJavaOptions (local mode: the executors' JVM too)


def run_spark(
    model: ScoringModel,
    source: InputSource,
    sink: Callable[[Predictions], None],
    options: SparkOptions,
    progress: Callable[[int], None],
    log: Path,
    scratch_parent: Path,
) -> int:
    """Score `source` on Spark into `sink`, in input order; returns the number of rows."""
    spark = _session(model, options, log)
    scratch = Path(tempfile.mkdtemp(dir=scratch_parent, prefix=".canary-score-spark-"))
    rows = spark.sparkContext.accumulator(0)
    try:
        with _polling(lambda: progress(min(rows.value, source.rows or rows.value))):
            try:
                scored = _scored(spark, model, source, rows, scratch)
                # persist: the sort samples its input first, and the model should run only once
                ordered = scored.persist().orderBy(*KEYS).select("class", "confidence", "scores")
                ordered.write.mode("overwrite").parquet(str(scratch / "parts"))
            except CanaryError:
                raise
            except Exception as exc:  # noqa: BLE001 - Py4J and PySpark wrap what failed in several types
                raise _one_line(exc, log) from None
        return _merge(scratch / "parts", model, sink, options.chunk_rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        spark.stop()


def _session(model: ScoringModel, options: SparkOptions, log: Path) -> Any:
    try:
        from pyspark import SparkConf, SparkContext
        from pyspark.java_gateway import launch_gateway
        from pyspark.sql import SparkSession
    except ImportError:
        raise CanaryError("--engine spark needs pyspark: pip install -e '.[spark]' (make setup does)") from None
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise CanaryError("--engine spark needs Java 17 or newer: run `make setup` (openjdk-17-jre-headless)")
    local = options.master.startswith("local")
    conf = (
        SparkConf()
        .setMaster(options.master)
        .setAppName(f"canary-score-{model.ref.label}")
        .set("spark.driver.memory", options.driver_memory)
        .set("spark.ui.enabled", "false")
        .set("spark.ui.showConsoleProgress", "false")
        .set("spark.sql.execution.arrow.maxRecordsPerBatch", str(options.chunk_rows))
    )
    if options.java_options:
        conf.set("spark.driver.extraJavaOptions", options.java_options)
    if local:  # a small, private session on this machine: its own address, few shuffle partitions
        conf.set("spark.driver.host", "127.0.0.1").set("spark.driver.bindAddress", "127.0.0.1")
        conf.set("spark.sql.shuffle.partitions", str(len(os.sched_getaffinity(0))))
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors' Python: this venv's
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as handle:  # the JVM's own chatter goes to the log, not the terminal
        try:
            gateway = launch_gateway(conf, popen_kwargs={"stdout": handle, "stderr": handle})
        except Exception as exc:  # noqa: BLE001 - the launcher raises bare exceptions
            raise CanaryError(f"Spark did not start ({_first_line(exc)}); see {log}") from None
    try:
        context = SparkContext(conf=conf, gateway=gateway)
    except Exception as exc:  # noqa: BLE001 - a bad master URL, no executors, a JVM that died
        raise _one_line(exc, log) from None
    context.setLogLevel("ERROR")
    return SparkSession(context)


def _scored(spark: Any, model: ScoringModel, source: InputSource, rows: Any, scratch: Path) -> Any:
    """The input as Spark reads it, scored per partition, each row with its place in the input."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import FloatType, StringType, StructField, StructType

    paths = [str(f.resolve()) for f in source.files]
    if source.format == "parquet":
        schema = _parquet_schema(source)
        frame = (spark.read.schema(schema) if schema is not None else spark.read).parquet(*paths)
    else:  # the header checked by open_input, the pixel columns parsed as floats
        fields = [StructField(c, FloatType() if c in source.layout.columns else StringType()) for c in source.header]
        frame = spark.read.csv(paths, header=True, schema=StructType(fields), mode="PERMISSIVE")
    keyed = frame.select(
        *[F.col(f"`{c}`") for c in source.layout.columns],
        F.col("_metadata.file_path").alias("_path"),
        F.col("_metadata.file_block_start").alias("_block"),
        F.monotonically_increasing_id().alias("_seq"),
    )
    shipped = _ship(spark, model, scratch)
    files = tuple((path, source.label(f)) for path, f in zip(paths, source.files, strict=True))
    udf = partial(score_partition, shipped, model.card, source.layout, model.scores_width, files, rows)
    return keyed.mapInArrow(udf, SCORED_SCHEMA)


def _parquet_schema(source: InputSource) -> Any:
    """The layout columns' Spark types, from the footers open_input read (Spark would run a job
    to read one itself); None when the files disagree or a type has no Spark equivalent."""
    import pyarrow.parquet as pq
    from pyspark.sql.pandas.types import from_arrow_schema

    schemas = set()
    for path in source.files:
        schema = pq.read_schema(path)
        schemas.add(pa.schema([schema.field(c) for c in source.layout.columns]))
    if len(schemas) != 1:
        return None
    try:
        return from_arrow_schema(schemas.pop())
    except (TypeError, ValueError, NotImplementedError):
        return None


def _ship(spark: Any, model: ScoringModel, scratch: Path) -> str:
    """Add the ONNX file to the job under a name unique to its content; returns that name.
    The copy stays in the scratch folder until the job is over: executors fetch it lazily."""
    name = f"{model.ref.name}-v{model.ref.version}-{model.sha256[:16]}.onnx"
    shutil.copyfile(model.path, scratch / name)
    spark.sparkContext.addFile(str(scratch / name))
    return name


# -- on the executors ------------------------------------------------------------------------
_RUNNERS: dict[str, OnnxRunner] = {}  # one session per Python worker, reused across tasks


def score_partition(
    shipped: str,
    card: ModelCard,
    layout: InputLayout,
    width: int,
    files: tuple[tuple[str, str], ...],
    rows: Any,
    batches: Iterator[pa.RecordBatch],
) -> Iterator[pa.RecordBatch]:
    """The UDF: every Arrow batch of a partition -> class, confidence, scores and its keys.
    `files` are the input's (absolute path, label) pairs in input order."""
    from pyspark import SparkFiles

    runner = _RUNNERS.get(card.sha256)
    if runner is None:
        runner = _RUNNERS[card.sha256] = open_runner(Path(SparkFiles.get(shipped)), card, threads=1)
    index = {path: i for i, (path, _label) in enumerate(files)}
    for batch in batches:
        file = _file_index(batch.column("_path"), index)
        features = to_features(batch, layout, card.input_range, partial(_file_label, files, file))
        answer = predict(runner, features)
        n = len(answer)
        offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
        scores = pa.ListArray.from_arrays(offsets, pa.array(answer.scores.reshape(-1), type=pa.float32()))
        columns = [pa.array(answer.classes), pa.array(answer.confidences), scores, pa.array(file, pa.int32())]
        yield pa.RecordBatch.from_arrays(
            [*columns, batch.column("_block"), batch.column("_seq")], ["class", "confidence", "scores", *KEYS]
        )
        rows.add(n)


def _file_label(files: tuple[tuple[str, str], ...], positions: np.ndarray, row: int) -> str:
    return files[int(positions[row])][1]


def _file_index(uris: pa.Array, index: dict[str, int]) -> np.ndarray:
    """Spark's file URIs (file:/..., percent-encoded) -> positions in the input's file order."""
    import pyarrow.compute as pc

    unique = pc.unique(uris).to_pylist()
    known = {uri: index.get(str(Path(unquote(urlparse(uri).path)).resolve()), -1) for uri in unique}
    missing = [uri for uri, i in known.items() if i < 0]
    if missing:
        raise RuntimeError(f"Spark read {missing[0]}, which is not one of the input's files")
    positions = pc.index_in(uris, pa.array(unique)).to_numpy(zero_copy_only=False)
    return np.asarray([known[uri] for uri in unique], dtype=np.int32)[positions]


# -- back on the driver ----------------------------------------------------------------------
def _merge(parts: Path, model: ScoringModel, sink: Callable[[Predictions], None], chunk_rows: int) -> int:
    """Stream the sorted part files, in partition order, into the sink."""
    import pyarrow.parquet as pq

    total = 0
    for part in sorted(parts.glob("part-*.parquet")):
        for batch in pq.ParquetFile(part).iter_batches(batch_size=chunk_rows):
            n = batch.num_rows
            scores = batch.column("scores").flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            sink(
                Predictions(
                    batch.column("class").to_numpy(zero_copy_only=False).astype(np.int64),
                    batch.column("confidence").to_numpy(zero_copy_only=False).astype(np.float32),
                    scores.reshape(n, model.scores_width),
                )
            )
            total += n
    return total


@contextlib.contextmanager
def _polling(report: Callable[[], None], every_s: float = 0.5) -> Iterator[None]:
    """Call `report` from a thread while the block runs (Spark's accumulator grows per task)."""
    done = threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            report()

    thread = threading.Thread(target=loop, name="spark-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        report()


def _one_line(exc: BaseException, log: Path) -> CanaryError:
    """A failed Spark job as one line: a refused input as the same InputError the local engine
    raises, anything else with its first line and the log."""
    java = getattr(exc, "java_exception", None)  # Py4JJavaError: the JVM's own exception says more
    text = f"{exc}\n{java}" if java is not None else str(exc)
    found = re.search(r"InputError: ([^\n]+)", text)
    if found:
        return InputError(found.group(1).strip())
    cause = str(java) if java is not None else str(exc)
    return CanaryError(f"the Spark job failed: {(cause.strip().splitlines() or ['?'])[0][:300]}; see {log}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
