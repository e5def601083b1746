"""`canary score --engine spark`: a real Spark in local mode (pyspark's own JVM), one run.

The local engine's output is the reference (tests/models/test_score.py holds it to the served
Bento, row for row); Spark must write the very same file: same rows in the same order, same
scores, same lineage columns and file metadata.
"""

from __future__ import annotations

import pytest

from tests.models.test_score import canary
from tests.support.canary_cli import run_canary
from tests.support.scoring import read_predictions, write_digits_folder

pytestmark = pytest.mark.slow
# A short job: C1-only JIT and the serial GC start the JVM on ~40% less CPU (models/score.py).
FAST_START = {"CANARY_SCORE_SPARK_JAVA_OPTIONS": "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"}


def test_spark_local_mode_writes_the_same_predictions_as_the_local_engine(built_pipeline, tmp_path, capsys):
    folder = tmp_path / "digits"
    x = write_digits_folder(folder)  # two files; Spark plans the larger, second one first
    version = str(built_pipeline.version)
    local, spark = tmp_path / "local.parquet", tmp_path / "spark.parquet"
    code, _, err = canary(capsys, "score", version, "-i", str(folder), "-o", str(local), "--logits")
    assert code == 0, err

    result = run_canary(
        "score", version, "-i", str(folder), "-o", str(spark), "--logits", "--engine", "spark", env=FAST_START
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "scored 1,797 rows" in result.stdout and "on spark" in result.stdout
    expected, actual = read_predictions(local), read_predictions(spark)
    assert actual.num_rows == len(x)
    assert actual.equals(expected, check_metadata=True)  # every value, in input order, and the lineage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "local.parquet", "spark.parquet"]  # no scratch left
