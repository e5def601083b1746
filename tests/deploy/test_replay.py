"""`canary score --replay`: a candidate judged on the real inputs the prediction log kept.

The end-to-end test sends distinct digits to a real `bentoml serve` whose prediction log keeps
inputs (the session's `serving`, logging to a real redis-server), posts labels for some, and
replays the window with a twin (the same training, registered again) and with a barely
trained model; the pure tests pin which rows a replay uses and how it judges.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest

from deploy.replay import collect_logged
from loadtest.gate import FAIL, INCONCLUSIVE, PASS, GateThresholds, PairedAnswers, decide_paired
from models.data import load_split
from service.core.predlog import LogIdentity, Prediction, UnreadableInput, row_inputs, to_row
from service.sinks import open_store
from tests.support.canary_cli import canary_in_process as canary
from tests.support.predlog import FEEDBACK, LabelStore
from tests.support.waiting import wait_until

THRESHOLDS = GateThresholds.from_yaml()


def logged_row(request_id: str, rows: np.ndarray, version: str = "1", *, shadow: bool = False, keep: bool = True):
    classes = [int(r.sum()) % 10 for r in rows]
    p = Prediction(request_id, time.time(), "rest", shadow, 0.002, rows, "FP32", classes, [0.9] * len(rows))
    return to_row(p, LogIdentity("blue", "digits", version), keep)


def test_a_logged_input_reads_back_exactly_and_tampered_bytes_are_refused():
    rows = np.random.default_rng(0).random((3, 64), dtype=np.float32) * 16
    row = logged_row("a", rows)
    np.testing.assert_array_equal(row_inputs(row), rows)
    assert row_inputs(logged_row("b", rows, keep=False)) is None
    with pytest.raises(UnreadableInput, match="sha256"):
        row_inputs({**row, "input_b64": logged_row("c", rows + 1)["input_b64"]})
    with pytest.raises(UnreadableInput, match="shape"):
        row_inputs({**row, "input_shape": [4, 64], "input_sha256": None})
    with pytest.raises(UnreadableInput, match="base64"):
        row_inputs({**row, "input_b64": "%%%"})


def test_a_replay_uses_only_live_answers_of_other_versions_that_kept_their_input():
    x = np.arange(5 * 64, dtype=np.float32).reshape(5, 64) % 17
    rows = [
        logged_row("live-2", x[:2], "1"),
        logged_row("shadow", x[2:3], "1", shadow=True),
        logged_row("own", x[3:4], "7"),  # answered by the candidate (version 7) itself
        logged_row("no-input", x[4:5], "1", keep=False),
        {**logged_row("broken", x[4:5], "1"), "input_shape": [1, 32], "input_sha256": None},
        logged_row("live-1", x[4:5], "2"),
    ]
    logged = collect_logged(iter(rows), LabelStore({"live-2": (3, 4), "live-1": (1, 2)}), "7", 64)

    assert logged.rows == 3 and logged.requests == 2
    np.testing.assert_array_equal(np.concatenate(logged.features), np.concatenate([x[:2], x[4:5]]))
    assert logged.classes == rows[0]["classes"] + rows[5]["classes"]
    assert logged.labels == [3, 4, -1]  # a label list that does not match the rows is not used
    assert logged.versions == {"1": 2, "2": 1}
    assert logged.skipped == {
        "shadow copies": 1, "answered by the candidate itself": 1, "logged without their input": 1,
        "unreadable or not 64 values per row": 1,
    }  # fmt: skip


def stats(live: list[int], candidate: list[int], labels: list[int] | None = None, shift: float = 0.0) -> PairedAnswers:
    n = len(live)
    confidences = np.linspace(0.5, 1.0, n, dtype=np.float32)
    return PairedAnswers(
        np.asarray(live), confidences, np.asarray(candidate), np.clip(confidences - shift, 0, 1),
        np.asarray(labels if labels is not None else [-1] * n),
    )  # fmt: skip


def test_the_replay_verdict_uses_the_gates_limits():
    same = list(np.arange(1000) % 10)
    assert decide_paired(stats(same, same), THRESHOLDS, "logged rows").verdict == PASS
    assert decide_paired(stats(same[:100], same[:100]), THRESHOLDS, "logged rows").verdict == INCONCLUSIVE
    off = [(c + 1) % 10 if i % 5 == 0 else c for i, c in enumerate(same)]  # 80% agreement
    failed = decide_paired(stats(same, off), THRESHOLDS, "logged rows")
    assert failed.verdict == FAIL and "agreement 0.8" in failed.summary
    unsure = decide_paired(stats(same, same, shift=0.4), THRESHOLDS, "logged rows")
    assert unsure.verdict == FAIL and "confidence_ks" in unsure.summary
    # labels: a candidate that agrees 97% but loses 3 points of accuracy on the labelled rows fails
    worse = [(c + 1) % 10 if i % 33 == 0 else c for i, c in enumerate(same)]
    labelled = decide_paired(stats(same, worse, labels=same), THRESHOLDS, "logged rows")
    assert labelled.verdict == FAIL and "accuracy_drop_pp 3.1" in labelled.summary
    assert "accuracy_drop_pp" not in {
        c.name for c in decide_paired(stats(same, worse), THRESHOLDS, "logged rows").checks
    }
    # two discordant rows among 40 labels are 5 points, but McNemar's p is 0.25: not yet a drop
    few = [-1] * 1000
    few[:40] = same[:40]
    lucky = decide_paired(stats(same, worse, labels=few), THRESHOLDS, "logged rows")
    drop = next(c for c in lucky.checks if c.name == "accuracy_drop_pp")
    assert drop.passed and drop.value == pytest.approx(5.0) and "p=0.25 " in drop.detail, drop.detail


@pytest.fixture(scope="module")
def candidates(canary_home, built_pipeline) -> dict[str, int]:
    """A twin of the served version (the same training, registered again) and a barely
    trained model of the same architecture (one epoch at a tiny learning rate)."""
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    made = {}
    for name, config in (
        ("twin", TrainConfig(model="digits-cnn", epochs=3, seed=0)),
        ("untrained", TrainConfig(model="digits-cnn", epochs=1, seed=1, learning_rate=1e-6)),
    ):
        trained = train_and_register(canary_home, config)
        export_version(canary_home, version=trained.ref.version)
        made[name] = trained.ref.version
    return made


@pytest.mark.slow
def test_a_replay_of_logged_traffic_passes_a_twin_and_flags_a_disagreeing_candidate(
    serving, built_pipeline, candidates, capsys
):
    split = load_split()
    x, y = split.x_test, split.y_test  # 360 distinct digits
    since = datetime.now(UTC).isoformat()
    ids = []
    for start in range(0, len(x), 8):  # 45 requests of 8 rows, then 90 of one row: 450 rows
        rows = x[start : start + 8]
        body = {
            "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]
        }
        answer = httpx.post(f"{serving.v2}/v2/models/digits/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text
    for i in range(90):
        answer = httpx.post(f"{serving.url}/classify", json={"pixels": x[i : i + 1].tolist()}, timeout=30)
        assert answer.status_code == 200, answer.text
        ids.append((answer.headers["x-request-id"], int(y[i])))
    store = open_store(serving.redis.url)
    wait_until(lambda: len(store.lookup("digits", [rid for rid, _ in ids])) == len(ids), 30, "the log")
    store.close()
    labels = [{"id": rid, "label": label} for rid, label in ids]  # ground truth, posted later
    assert httpx.post(serving.v2 + FEEDBACK, json=labels, timeout=30).status_code == 200
    window = ("--since", since, "--until", "now", "--from", serving.redis.url)

    code, out, err = canary(capsys, "score", "--replay", str(candidates["twin"]), *window)
    assert code == 0, out + err
    assert "replayed 450 logged rows (135 requests" in out
    assert f"answered live by v{built_pipeline.version}: 450" in out
    assert "agreement 1.0000" in out and "accuracy on 90 labelled rows" in out
    assert "pass: 4 checks passed" in out

    code, out, err = canary(capsys, "score", "--replay", str(candidates["untrained"]), *window)
    assert code == 1 and "Traceback" not in err
    assert "replayed 450 logged rows" in out and "fail: " in out and "agreement 0." in out.splitlines()[-1]

    # the served version's own answers are not evidence about itself
    code, out, err = canary(capsys, "score", "--replay", str(built_pipeline.version), *window)
    assert code == 1 and "nothing to replay in the window (135 answered by the candidate itself" in err


@pytest.mark.slow
def test_replay_refusals_are_one_line(serving, built_pipeline, capsys, tmp_path):
    store = ("--from", serving.redis.url)
    future = ("--since", "2100-01-01T00:00:00", "--until", "2100-01-02T00:00:00")
    cases = [
        (
            ("score", "--replay", str(built_pipeline.version), *store, *future),
            "nothing to replay in the window (no rows",
        ),
        (("score", "--replay", "99", *store), "99"),
        (("score", "--replay", "1", "--input", str(tmp_path)), "leave out --input and --output"),
        (("score", "1"), "score needs --input and --output"),
        (("score", "--replay", "1", "--from", "ftp://x"), "--from"),
        (("score", "--replay", "1", "--since", "yesterday"), "time 'yesterday' must be like"),
        (("score", "--replay", "1", "--since", "now", "--until", "1h"), "the window is empty"),
        (("score", "--replay", "1", "--thresholds", str(tmp_path / "none.yaml")), "--thresholds"),
    ]
    for args, expected in cases:
        code, out, err = canary(capsys, *args)
        assert code == 1, (args, out, err)
        assert expected in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, (args, err)
    from deploy.process import free_port

    dead = f"redis://127.0.0.1:{free_port()}"
    code, _, err = canary(capsys, "score", "--replay", str(built_pipeline.version), "--from", dead)
    assert code == 1 and "cannot read the prediction log from --from redis://127.0.0.1" in err
