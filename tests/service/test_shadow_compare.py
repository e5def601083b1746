"""The shadow diff on the candidate slot (issue 15): each copy's answer compared with stable's
answer to the same request id, from the shared log's store, into the slot's metrics.

End to end with two real V2 listeners (stable and candidate) logging to one real
redis-server; the waiting and expiry rules with a stand-in store and clock."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from service.core.feedback import LoggedPrediction
from service.core.shadow_compare import ShadowComparer, ShadowTally
from service.sinks import open_store
from tests.support.predlog import INFER, RecordingObserver, logged_server
from tests.support.redis_server import RedisProcess, redis_server  # noqa: F401
from tests.support.tiny_model import digits_rows
from tests.support.waiting import wait_until


class RecordingShadow(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[ShadowTally] = []
        self.unmatched = 0
        self.shadow_lock = threading.Lock()

    def shadow_compared(self, pairs: list[ShadowTally]) -> None:
        with self.shadow_lock:
            self.pairs += pairs

    def shadow_unmatched(self, copies: int) -> None:
        with self.shadow_lock:
            self.unmatched += copies

    def rows(self) -> tuple[int, int]:
        with self.shadow_lock:
            return sum(p.rows for p in self.pairs), sum(p.agreed for p in self.pairs)


@pytest.mark.parametrize(("candidate_seed", "all_agree"), [(0, True), (1, False)], ids=["twin", "different"])
def test_copies_are_compared_with_stables_answers_to_the_same_request(tmp_path, candidate_seed, all_agree):
    x = digits_rows(120, seed=5)
    with RedisProcess() as redis:
        observer = RecordingShadow()
        candidate_store = open_store(redis.url)
        comparer = ShadowComparer(candidate_store, "digits", observer)
        with (
            logged_server(tmp_path, open_store(redis.url), version="1", slot="blue") as stable,
            logged_server(tmp_path, candidate_store, version="2", slot="green", seed=candidate_seed,
                          on_written=comparer.after_cycle) as candidate,
        ):  # fmt: skip
            same = 0
            with httpx.Client(timeout=30) as client:
                for i, row in enumerate(x):
                    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
                    rid = {"X-Request-Id": f"shadow-{candidate_seed}-{i}"}
                    live = client.post(stable.url + INFER, json=body, headers=rid)
                    copy = client.post(candidate.url + INFER, json=body, headers={**rid, "X-Canary-Shadow": "1"})
                    assert live.status_code == copy.status_code == 200
                    same += int(
                        np.argmax(live.json()["outputs"][0]["data"]) == np.argmax(copy.json()["outputs"][0]["data"])
                    )
            compared, agreed = wait_until(lambda: observer.rows()[0] == len(x) and observer.rows(), 30, "120 pairs")
    assert agreed == same and (agreed == len(x)) == all_agree, (agreed, same)
    assert {p.stable_version for p in observer.pairs} == {"1"} and observer.unmatched == 0
    # every copy found stable's confidences and latency (the sums cover all 120 rows and requests)
    confidence = [sum(p.confidence_candidate for p in observer.pairs), sum(p.confidence_stable for p in observer.pairs)]
    latency = [sum(p.latency_candidate_s for p in observer.pairs), sum(p.latency_stable_s for p in observer.pairs)]
    assert sum(p.requests for p in observer.pairs) == len(x) and min(confidence) > 0.1 * len(x) and min(latency) > 0
    if all_agree:  # the same model: the same confidences
        assert confidence[0] == pytest.approx(confidence[1], abs=1e-4)


class StandInStore:
    def __init__(self) -> None:
        self.answers: dict[str, LoggedPrediction] = {}

    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]:
        return {i: self.answers[i] for i in ids if i in self.answers}


def shadow_row(rid: str, classes: list[int]) -> dict:
    return {"request_id": rid, "shadow": True, "classes": classes, "confidences": [0.5] * len(classes),
            "latency_ms": 4.0}  # fmt: skip


def test_a_copy_waits_for_stables_answer_then_counts_as_unmatched():
    now = [0.0]
    store, observer = StandInStore(), RecordingShadow()
    comparer = ShadowComparer(store, "digits", observer, wait_s=10.0, max_pending=3, clock=lambda: now[0])
    comparer.after_cycle([shadow_row("a", [1]), shadow_row("b", [2, 3]), {"request_id": "c", "shadow": False}])
    assert observer.pairs == [] and observer.unmatched == 0  # stable's answers not logged yet
    store.answers["a"] = LoggedPrediction("digits", "1", "blue", (1,), (0.75,), 3.0)
    store.answers["b"] = LoggedPrediction("digits", "1", "blue", (2,), (0.75,), 3.0)  # one row, not two
    now[0] = 5.0
    comparer.after_cycle([])
    assert observer.pairs == [ShadowTally("1", 1, 1, 1, 0.5, 0.75, 0.004, 0.003)] and observer.unmatched == 1
    comparer.after_cycle([shadow_row("d", [4])])
    now[0] = 16.0  # d waited 11 s: stable never logged it
    comparer.after_cycle([])
    assert observer.unmatched == 2
    comparer.after_cycle([shadow_row(str(i), [0]) for i in range(5)])  # over max_pending: the oldest go
    assert observer.unmatched == 4
    # an answer logged before stable kept confidences (older rows) is compared on classes only
    store.answers["4"] = LoggedPrediction("digits", "1", "blue", (0,))
    comparer.after_cycle([])
    assert observer.pairs[-1] == ShadowTally("1", requests=1, rows=1, agreed=1)


SUMS = ("confidence_candidate", "confidence_stable", "latency_candidate_s", "latency_stable_s")


class LookupOnly:
    """The same store seen through `lookup` only: the comparer pairs in Python (PostgreSQL's way)."""

    def __init__(self, store) -> None:
        self.lookup = store.lookup


def test_redis_pairs_the_copies_itself_exactly_as_python_does(redis_server):  # noqa: F811
    """Stable's answers of every kind (agreeing, disagreeing, two rows, another row count, no
    confidences, another model, two stable versions, not logged yet): the script's tallies,
    done ids and unmatched counts equal the Python pairing's on the same store."""
    store = open_store(redis_server.url)
    stable = [  # (id, model, version, classes, confidences, latency)
        ("same", "digits", "1", [3], [0.75], 2.5), ("differs", "digits", "1", [4], [0.5], 3.0),
        ("two", "digits", "2", [1, 2], [0.25, 0.125], 5.0), ("rows", "digits", "1", [7], [0.5], 1.0),
        ("other-model", "letters", "1", [3], [0.5], 1.0), ("no-confidences", "digits", "1", [2], [], None),
        ("nan", "digits", "2", [6], [float("nan")], 1.0),
    ]  # fmt: skip
    store.write([{**shadow_row(i, c), "shadow": False, "model": m, "model_version": v, "slot": "blue",
                  "confidences": conf, "latency_ms": lat, "time": 1.0, "protocol": "rest", "rows": len(c),
                  "input_datatype": "FP32", "input_shape": [len(c), 64], "input_sha256": "", "input_b64": None}
                 for i, m, v, c, conf, lat in stable])  # fmt: skip
    copies = [shadow_row("same", [3]), shadow_row("differs", [9]), shadow_row("two", [1, 5]),
              shadow_row("rows", [7, 7]), shadow_row("other-model", [3]), shadow_row("late", [0]),
              shadow_row("no-confidences", [2]), shadow_row("nan", [6])]  # fmt: skip
    results, seen = [], []
    for seen_by in (store, LookupOnly(store)):
        observer, now = RecordingShadow(), [0.0]
        comparer = ShadowComparer(seen_by, "digits", observer, wait_s=10.0, clock=lambda now=now: now[0])
        comparer.after_cycle(copies)
        first = (sorted(observer.pairs, key=lambda t: t.stable_version), observer.unmatched, sorted(comparer._pending))
        # the sums compared to 12 significant digits: Lua and Python may add in another order
        seen.append([(t.stable_version, t.requests, t.rows, t.agreed, *(float(f"{getattr(t, f):.12g}") for f in SUMS))
                     for t in first[0]])  # fmt: skip
        now[0] = 11.0
        comparer.after_cycle([])
        results.append((first[1:], observer.unmatched))
    assert seen[0] == seen[1] and results[0] == results[1], (seen, results)
    ((unmatched, waiting), later), tallies = results[0], first[0]
    assert [(t.stable_version, t.requests, t.rows, t.agreed) for t in tallies] == [("1", 3, 3, 2), ("2", 2, 3, 2)]
    assert tallies[0].confidence_stable == pytest.approx(1.25) and tallies[0].confidence_candidate == pytest.approx(1.0)
    assert tallies[0].latency_stable_s == pytest.approx(0.0055) and tallies[1].latency_stable_s == pytest.approx(0.006)
    assert tallies[1].confidence_stable == pytest.approx(0.375)  # a NaN answer is compared, its confidence not summed
    assert unmatched == 1 and waiting == ["late", "other-model"] and later == 3


def test_a_store_failing_mid_cycle_costs_no_copy_that_was_already_paired():
    """1,500 copies pending: the first chunk of 1,000 is paired and counted, the store then
    fails; the other 500 wait for the next cycle and the failure reaches the log's writer."""

    class FailingSecondTime(StandInStore):
        calls = 0

        def lookup(self, model, ids):
            FailingSecondTime.calls += 1
            if FailingSecondTime.calls == 2:
                raise ConnectionError("store went away")
            return super().lookup(model, ids)

    store, observer = FailingSecondTime(), RecordingShadow()
    for i in range(1500):
        store.answers[str(i)] = LoggedPrediction("digits", "1", "blue", (0,), (0.5,), 3.0)
    comparer = ShadowComparer(store, "digits", observer, clock=lambda: 0.0)
    with pytest.raises(ConnectionError):
        comparer.after_cycle([shadow_row(str(i), [0]) for i in range(1500)])
    assert sum(t.requests for t in observer.pairs) == 1000 and len(comparer._pending) == 500
    comparer.after_cycle([])  # the store is back
    assert sum(t.requests for t in observer.pairs) == 1500 and not comparer._pending and observer.unmatched == 0
