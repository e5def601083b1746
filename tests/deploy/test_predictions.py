"""deploy/predictions.py and `canary predictions`: a time range of a real Redis log exported
to Parquet and CSV, filtered, labels joined; bad options are one line and exit code 1."""

from __future__ import annotations

import csv
import json
import time

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deploy.cli import app
from deploy.predictions import ExportResult, export_from, export_predictions, parse_when
from models.errors import CanaryError
from service.core.feedback import JudgedLabel
from service.sinks import open_store
from tests.support.canary_cli import assert_one_line_error, run_canary
from tests.support.redis_server import redis_server  # noqa: F401

NOW = 1_800_000_000.0


def row(i: int, at: float, slot: str = "blue", version: str = "3") -> dict:
    return {
        "request_id": f"r{i}", "time": at, "slot": slot, "model": "digits", "model_version": version,
        "protocol": "rest" if i % 2 else "grpc", "shadow": False, "rows": 1, "classes": [i % 10],
        "confidences": [0.5 + i / 1000], "latency_ms": 1.5, "input_datatype": "FP32", "input_shape": [1, 64],
        "input_sha256": f"{i:064x}", "input_b64": None,
    }  # fmt: skip


@pytest.fixture
def logged(redis_server):  # noqa: F811
    """(store, start): 400 rows 0.1 s apart from `start` (answered in the last minute, as a
    slot writes them), blue v3 then green v4; r5 labelled."""
    store = open_store(redis_server.url)
    start = time.time() - 45
    rows = [row(i, start + i / 10, "blue" if i < 300 else "green", "3" if i < 300 else "4") for i in range(400)]
    store.write(rows)
    store.add_labels([JudgedLabel("r5", "digits", "3", "blue", (5,), 1)])
    return store, start


def test_parse_when_reads_ago_now_and_iso_times():
    assert parse_when("1h", NOW) == NOW - 3600 and parse_when("30m", NOW) == NOW - 1800
    assert parse_when("now", NOW) == NOW and parse_when("90s", NOW) == NOW - 90
    assert parse_when("2027-01-15T08:00:00", NOW) == parse_when("2027-01-15T08:00:00+00:00", NOW)
    with pytest.raises(CanaryError, match="must be like"):
        parse_when("yesterday", NOW)


def test_a_window_exports_to_parquet_with_its_labels_and_round_trips(logged, tmp_path):
    store, start = logged
    out = tmp_path / "w.parquet"
    result = export_predictions(store, out, start + 10, start + 35)
    table = pq.read_table(out).to_pylist()
    assert result.rows == len(table) == 250 and result.labelled == 0  # r5 is labelled, outside
    assert [r["request_id"] for r in table] == [f"r{i}" for i in range(100, 350)]
    first = table[0]
    assert (first["classes"], first["input_shape"], first["labels"]) == ([0], [1, 64], None)
    assert first["confidences"][0] == pytest.approx(0.6) and first["time"].timestamp() == pytest.approx(start + 10)
    green = export_predictions(store, tmp_path / "g.parquet", start, start + 40, slot="green")
    assert green.rows == 100
    labelled = pq.read_table(export_predictions(store, tmp_path / "l.parquet", start, start + 1).path)
    assert next(r for r in labelled.to_pylist() if r["request_id"] == "r5")["labels"] == [5]


def test_csv_has_json_lists_and_the_version_filter(logged, tmp_path):
    store, start = logged
    out = tmp_path / "v4.csv"
    assert export_predictions(store, out, start, start + 40, version="4").rows == 100
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 100 and {r["model_version"] for r in rows} == {"4"}
    assert json.loads(rows[0]["classes"]) == [0] and json.loads(rows[0]["input_shape"]) == [1, 64]


def test_an_empty_window_is_a_file_with_the_columns(logged, tmp_path):
    store, start = logged
    result = export_predictions(store, tmp_path / "none.parquet", start - 900, start - 800)
    assert export_predictions(store, tmp_path / "w.csv", start + 40, start + 50).rows == 0
    assert result.rows == 0 and "request_id" in pq.read_table(result.path).column_names


def test_the_cli_exports_from_a_store_url_and_fails_in_one_line(logged, redis_server, tmp_path):  # noqa: F811
    out = tmp_path / "cli.parquet"
    done = run_canary("predictions", "--from", redis_server.url, "--since", "1h", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"400 predictions (1 labelled) -> {out}"
    redis_server.kill()
    assert_one_line_error(run_canary("predictions", "--from", redis_server.url, "--output", str(out)),
                          "cannot read the prediction log")  # fmt: skip


@pytest.mark.parametrize(
    ("source", "since", "output", "message"),
    [("redis://127.0.0.1:1/0", "1h", "x.json", ".parquet or .csv"), ("mysql://db", "1h", "x.csv", "--from"),
     ("redis://127.0.0.1:1/0", "soon", "x.csv", "must be like")],
)  # fmt: skip
def test_bad_options_are_one_canary_error(tmp_path, source, since, output, message):
    with pytest.raises(CanaryError, match=message):
        export_from(None, source, str(tmp_path / output), since, "now", None, None)


def test_the_command_only_translates_its_options(monkeypatch, tmp_path):
    import deploy.predictions

    calls = []

    def export_from(*args):
        calls.append(args[1:])
        return ExportResult(tmp_path / "x.csv", 3, 1, 0.0, 1.0)

    monkeypatch.setattr(deploy.predictions, "export_from", export_from)
    argv = ["predictions", "--since", "2h", "--until", "10m", "--slot", "green", "--version", "4", "-o", "x.csv",
            "--from", "redis://h/0"]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert calls == [("redis://h/0", "x.csv", "2h", "10m", "green", "4")]
    assert result.output.strip() == f"3 predictions (1 labelled) -> {tmp_path / 'x.csv'}"
