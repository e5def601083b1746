"""`canary score` on the local engine: the served graph over files, and its refusals.

The agreement test compares with a real `bentoml serve` of the same version (the session's
`served` fixture); bad input goes through the CLI's own entry point (`deploy.cli.main`).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from models.home import CanaryHome
from models.registry import Registry
from tests.support.canary_cli import canary_in_process as canary
from tests.support.scoring import all_digits, pixel_table, read_predictions, write_digits_folder

pytestmark = pytest.mark.slow


def served_answers(url: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classes and confidences from the served native API, 1,024 rows (its limit) per request."""
    classes, confidences = [], []
    for start in range(0, len(x), 1024):
        answer = httpx.post(f"{url}/classify", json={"pixels": x[start : start + 1024].tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        classes += answer.json()["classes"]
        confidences += answer.json()["confidences"]
    return np.asarray(classes), np.asarray(confidences)


def test_scored_file_agrees_with_the_served_bento_on_every_digit(
    served, built_pipeline, canary_home: CanaryHome, tmp_path, capsys
):
    x = write_digits_folder(tmp_path / "digits")
    output = tmp_path / "scored.parquet"

    code, out, err = canary(
        capsys, "score", str(built_pipeline.version), "--input", str(tmp_path / "digits"), "--output", str(output),
        "--logits", "--workers", "2", "--chunk-rows", "500",
    )  # fmt: skip

    assert code == 0, err
    assert "scored 1,797 rows" in out and "Traceback" not in err
    table = read_predictions(output)
    classes, confidences = served_answers(served, x)
    assert table.num_rows == len(x) == 1797
    np.testing.assert_array_equal(table["class"].to_numpy(), classes)  # 100% agreement, row for row
    np.testing.assert_allclose(table["confidence"].to_numpy(), confidences, rtol=1e-6)
    logits = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(logits.argmax(1), classes)
    assert set(table["model_version"].to_pylist()) == {str(built_pipeline.version)}
    assert set(table["model_sha256"].to_pylist()) == {built_pipeline.sha256}
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(output).metadata.items()}
    assert metadata["canary.model_sha256"] == built_pipeline.sha256
    assert metadata["canary.model_version"] == str(built_pipeline.version)

    client = Registry(canary_home).client
    experiment = client.get_experiment_by_name("digits-scoring")
    runs = client.search_runs([experiment.experiment_id], f"tags.input_digest = '{metadata['canary.input_digest']}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["model_version"] == str(built_pipeline.version)
    assert runs[0].data.tags["model_sha256"] == built_pipeline.sha256
    assert runs[0].data.metrics["rows"] == 1797 and runs[0].data.metrics["rows_per_s"] > 0


def test_csv_in_gives_the_same_answers_as_parquet_and_csv_out(built_pipeline, tmp_path, capsys):
    x = all_digits()[:300]
    pacsv.write_csv(pixel_table(x.astype(np.int64)), tmp_path / "digits.csv")
    pq.write_table(
        pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)}), tmp_path / "list.parquet"
    )
    version = str(built_pipeline.version)

    for source, target in (("digits.csv", "a.csv"), ("list.parquet", "b.parquet")):
        code, _, err = canary(capsys, "score", version, "-i", str(tmp_path / source), "-o", str(tmp_path / target))
        assert code == 0, err

    from_csv = pacsv.read_csv(tmp_path / "a.csv")
    from_list = read_predictions(tmp_path / "b.parquet")
    assert from_csv.num_rows == from_list.num_rows == 300
    np.testing.assert_array_equal(from_csv["class"].to_numpy(), from_list["class"].to_numpy())
    assert from_csv.column_names == ["class", "confidence", "model_version", "model_sha256"]


def _bad_inputs(folder: Path) -> dict[str, tuple[str, ...]]:
    """Each bad input file -> fragments its one-line error must contain."""
    x = all_digits()[:50]
    table = pixel_table(x)
    pq.write_table(table.drop_columns(["input_63"]), folder / "missing.parquet")
    pq.write_table(table.set_column(3, "input_3", pa.array([str(v) for v in x[:, 3]])), folder / "text.parquet")
    nan = x.copy()
    nan[4, 10] = np.nan
    pq.write_table(pixel_table(nan), folder / "nan.parquet")
    high = x.copy()
    high[7, 0] = 17
    pq.write_table(pixel_table(high), folder / "high.parquet")
    (folder / "broken.parquet").write_bytes(b"PAR1 not really")
    return {
        "missing.parquet": ("missing column(s) input_63",),
        "text.parquet": ("input_3", "must hold numbers"),
        "nan.parquet": ("nan.parquet row 5", "input_10", "NaN"),
        "high.parquet": ("high.parquet row 8", "input_0 is 17", "[0, 16]"),
        "broken.parquet": ("broken.parquet is not a readable PARQUET file",),
        "absent.parquet": ("absent.parquet does not exist",),
    }


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, last


def test_bad_input_is_one_line_exit_1_and_leaves_the_old_output(built_pipeline, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    output = out_dir / "scored.parquet"
    output.write_bytes(b"yesterday's predictions")

    for name, fragments in _bad_inputs(inputs).items():
        code, _, err = canary(capsys, "score", str(built_pipeline.version), "-i", str(inputs / name), "-o", str(output))
        assert_one_line(code, err, *fragments)
        assert output.read_bytes() == b"yesterday's predictions"
        assert [p.name for p in out_dir.iterdir()] == ["scored.parquet"]  # no temporary file left


@pytest.mark.parametrize(
    ("release", "output", "fragments"),
    [
        ("999", "out/scored.parquet", ("digits/999 does not exist",)),
        ("@nope", "out/scored.parquet", ("alias 'nope'",)),
        ("latest", "out/scored.parquet", ("not a model version or @alias",)),
        ("VERSION", "nowhere/scored.parquet", ("folder", "does not exist")),
        ("VERSION", "blocker/scored.parquet", ("does not exist",)),
        ("VERSION", "out", ("is a folder",)),
        ("VERSION", "out/scored.json", (".parquet or .csv",)),
    ],
)
def test_unknown_versions_and_unwritable_outputs_are_refused(
    built_pipeline, tmp_path, capsys, release, output, fragments
):
    (tmp_path / "out").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    pq.write_table(pixel_table(all_digits()[:10]), tmp_path / "digits.parquet")
    release = release.replace("VERSION", str(built_pipeline.version))

    code, _, err = canary(
        capsys, "score", release, "-i", str(tmp_path / "digits.parquet"), "-o", str(tmp_path / output)
    )

    assert_one_line(code, err, *fragments)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_graph_whose_sha256_the_registry_does_not_record_is_refused(built_pipeline, canary_home, tmp_path, capsys):
    client = Registry(canary_home).client
    version = str(built_pipeline.version)
    pq.write_table(pixel_table(all_digits()[:10]), tmp_path / "digits.parquet")
    client.set_model_version_tag("digits", version, "onnx_sha256", "0" * 64)
    try:
        code, _, err = canary(
            capsys, "score", version, "-i", str(tmp_path / "digits.parquet"), "-o", str(tmp_path / "o.csv")
        )
    finally:
        client.set_model_version_tag("digits", version, "onnx_sha256", built_pipeline.sha256)

    assert_one_line(code, err, "the registry records 000000000000")
    assert not (tmp_path / "o.csv").exists()
