"""POST /v2/models/{name}/feedback on the real V2 listener (tiny model, in process) against a
real redis-server: labels joined to logged predictions, tallied per version, idempotent;
unknown ids, conflicts and hostile bodies are 4xx, never a 500."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.core.feedback import MAX_LABELS
from service.sinks import open_store
from service.v2.rest import V2RestApp
from tests.support.predlog import FEEDBACK, INFER, LoggedServer, logged_server
from tests.support.redis_server import RedisProcess
from tests.support.tiny_model import digits_rows, tiny_core
from tests.support.v2_listener import listening
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def redis_for_feedback():
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_for_feedback):
    with logged_server(tmp_path_factory.mktemp("feedback"), open_store(redis_for_feedback.url)) as running:
        yield running


def predict(server: LoggedServer, count: int, seed: int = 0, rows: int = 1) -> list[tuple[str, list[int]]]:
    """`count` answered requests of `rows` digits each: (request id, predicted classes), once logged."""
    x = digits_rows(count * rows, seed=seed).reshape(count, rows, 64)
    answers = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for pixels in x:
            body = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": pixels.tolist()}]}
            answer = client.post(INFER, json=body)
            answer.raise_for_status()
            logits = np.asarray(answer.json()["outputs"][0]["data"]).reshape(rows, -1)
            answers.append((answer.headers["x-request-id"], logits.argmax(1).tolist()))
    store = server.predlog.sink
    wait_until(lambda: len(store.lookup("digits", [rid for rid, _ in answers])) == count, 10, "every id joinable")
    return answers


def post(server: LoggedServer, payload, **kwargs) -> httpx.Response:
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return httpx.post(server.url + FEEDBACK, content=content, timeout=30, **kwargs)


def tally(server: LoggedServer) -> tuple[int, int]:
    """(labelled rows, correct rows) of the server's version, from the store."""
    found = server.predlog.sink.tallies("digits").get(server.version)
    return (found.labels, found.correct) if found else (0, 0)


def test_online_accuracy_is_the_share_of_labels_the_version_got_right(server):
    answers = predict(server, 20, seed=1)
    before = tally(server)
    labels = [{"id": rid, "label": classes[0] if i < 15 else (classes[0] + 1) % 10}
              for i, (rid, classes) in enumerate(answers)]  # fmt: skip
    first = post(server, labels)
    assert first.status_code == 200 and first.json() == {"accepted": 20, "duplicates": 0}
    after = server.predlog.sink.tallies("digits")[server.version]
    assert (after.labels - before[0], after.correct - before[1]) == (20, 15)
    # what /metrics publishes: the store's tally for the version that predicted
    assert server.observer.online[server.version] == (after.labels, after.correct)
    again = post(server, labels)  # a resend counts nothing twice
    assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 20}
    one = post(server, labels[0])  # one object works as well as a list
    assert one.json() == {"accepted": 0, "duplicates": 1}
    assert server.predlog.sink.tallies("digits")[server.version] == after


def test_a_request_of_several_rows_takes_one_label_per_row(server):
    (rid, classes), = predict(server, 1, seed=2, rows=3)  # fmt: skip
    wrong_length = post(server, {"id": rid, "label": classes[:2]})
    assert wrong_length.status_code == 400 and "3 row(s)" in wrong_length.json()["error"]
    before = tally(server)
    assert post(server, {"id": rid, "label": classes}).json() == {"accepted": 1, "duplicates": 0}
    after = tally(server)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_unknown_or_expired_ids_are_a_404_naming_them_and_record_nothing(server):
    (known, classes), = predict(server, 1, seed=3)  # fmt: skip
    before = tally(server)
    answer = post(server, [{"id": known, "label": classes[0]}, {"id": "never-answered", "label": 1}])
    assert answer.status_code == 404
    assert "never-answered" in answer.json()["error"] and known not in answer.json()["error"]
    assert tally(server) == before  # all or nothing: the known one was not recorded either
    assert post(server, {"id": known, "label": classes[0]}).json()["accepted"] == 1


def test_a_different_label_for_a_labelled_id_is_a_409(server):
    (rid, classes), = predict(server, 1, seed=4)  # fmt: skip
    assert post(server, {"id": rid, "label": classes[0]}).status_code == 200
    conflict = post(server, {"id": rid, "label": (classes[0] + 1) % 10})
    assert conflict.status_code == 409 and rid in conflict.json()["error"]


HOSTILE = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"{}",
    b'"text"',
    b"[1, 2]",
    b"[[{}]]",
    b"[" * 5000 + b"]" * 5000,
    b'{"id": 7, "label": 1}',
    b'{"id": "ok", "label": true}',
    b'{"id": "ok", "label": -1}',
    b'{"id": "ok", "label": 10}',
    b'{"id": "ok", "label": 1.5}',
    b'{"id": "ok", "label": []}',
    b'{"id": "ok", "label": [1, "2"]}',
    b'{"id": "ok", "label": 1e999}',
    b'{"id": "ok", "label": NaN}',
    b'{"id": "has space", "label": 1}',
    b'{"id": "' + b"x" * 200 + b'", "label": 1}',
    b'{"id": "ok", "label": 1, "extra": 0}',
    b'{"id": "ok"}',
    b'{"label": 1}',
    b'[{"id": "a", "label": 1}, {"id": "a", "label": 2}]',
    b"\xff\xfe\x00",
    json.dumps([{"id": f"i{n}", "label": 1} for n in range(MAX_LABELS + 1)]).encode(),
    b'{"id": "ok", "label": 99999999999999999999999999}',
]


def test_hostile_bodies_are_refused_with_4xx_and_an_error_never_500(server):
    for payload in HOSTILE:
        answer = post(server, payload)
        assert 400 <= answer.status_code < 500, (payload[:60], answer.status_code, answer.text)
        assert isinstance(answer.json()["error"], str) and answer.headers["x-request-id"]
    too_big = post(server, b'{"id": "a", "label": 1}' + b" " * (2 << 20))
    assert too_big.status_code == 413
    assert httpx.get(server.url + FEEDBACK).status_code == 405
    assert httpx.post(server.url + "/v2/models/other/feedback", json={"id": "a", "label": 1}).status_code == 404


def test_labels_are_tallied_under_the_version_that_predicted_whichever_slot_takes_them(
    tmp_path, server, redis_for_feedback
):
    """The green slot (version 2, same store) takes labels for blue's predictions: they count
    for version 1, as the stack's nginx may send a post to either slot."""
    (rid, classes), = predict(server, 1, seed=5)  # fmt: skip
    before = tally(server)
    with logged_server(tmp_path, open_store(redis_for_feedback.url), version="2", slot="green", seed=1) as green:
        assert post(green, {"id": rid, "label": classes[0]}).json() == {"accepted": 1, "duplicates": 0}
        assert green.observer.labels == {"1": 1}
    after = tally(server)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_a_store_outage_is_a_503_to_retry_never_a_500(tmp_path):
    with RedisProcess() as redis_server:
        with logged_server(tmp_path, open_store(redis_server.url, timeout_s=0.3)) as server:
            (rid, classes), = predict(server, 1)  # fmt: skip
            redis_server.kill()
            answer = post(server, {"id": rid, "label": classes[0]})
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert "retry" in answer.json()["error"]


def test_without_a_prediction_log_feedback_is_a_clear_404(tmp_path):
    with listening(V2RestApp(8 << 20, tiny_core(tmp_path)), close_core=True) as url:
        answer = httpx.post(url + FEEDBACK, json={"id": "a", "label": 1})
    assert answer.status_code == 404 and "no prediction log" in answer.json()["error"]


@pytest.mark.parametrize(("flush_s", "settle_s"), [(60.0, 0.0), (1.5, 3.0)])
def test_a_label_posted_before_the_log_wrote_its_answer_waits_for_it(tmp_path, redis_for_feedback, flush_s, settle_s):
    """A label posted right after its answer finds no prediction yet (the writer flushes on
    its own timer). Without settling it is refused (404, the label lost: shown with a writer
    that waits a minute); the desk of a served slot looks again until the writer has caught
    up. An id that never comes stays a one-line 404."""
    store = open_store(redis_for_feedback.url)
    with logged_server(tmp_path, store, flush_interval_s=flush_s, settle_s=settle_s) as slow:
        with httpx.Client(base_url=slow.url, timeout=30) as client:
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                "data": digits_rows(1, seed=7)[0].tolist()}]}  # fmt: skip
            rid = client.post(INFER, json=body).headers["x-request-id"]
            labelled = client.post(FEEDBACK, json={"id": rid, "label": 1})
            if not settle_s:
                assert store.lookup("digits", [rid]) == {}  # the writer has not written it
                assert labelled.status_code == 404 and rid in labelled.json()["error"]
                return
            assert labelled.status_code == 200, labelled.text
            assert labelled.json() == {"accepted": 1, "duplicates": 0}
            assert rid in store.labels_of([rid])
            never = client.post(FEEDBACK, json=[{"id": rid, "label": 1}, {"id": "never-answered-1", "label": 2}])
    assert never.status_code == 404, never.text
    assert never.json() == {"error": "unknown or expired prediction id(s) never-answered-1: nothing was recorded; "
                            "post labels only for answered requests, within the label window"}  # fmt: skip
