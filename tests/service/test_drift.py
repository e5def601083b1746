"""Input drift (issue 15): the training digits as reference, live inputs scored by PSI.

The test split does not raise the figure; the same digits inverted or with noise raise it
above the alert level, through the real V2 listener and prediction log (writer thread) into
the slot's metrics, within a minute of traffic."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from models.data import PIXEL_RANGE, load_split
from service.core.drift import ALERT_PSI, DriftMonitor, DriftReference, psi
from service.sinks import open_store
from tests.support.predlog import INFER, RecordingObserver, logged_server
from tests.support.redis_server import RedisProcess
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def split():
    return load_split()


@pytest.fixture(scope="module")
def reference(split) -> DriftReference:
    return DriftReference.from_inputs(split.x_train, *PIXEL_RANGE)


def inverted(x: np.ndarray) -> np.ndarray:
    return PIXEL_RANGE[1] - x


def noisy(x: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(x + rng.normal(0, 4, x.shape), *PIXEL_RANGE).astype(np.float32)


def score_of(reference: DriftReference, x: np.ndarray, window: int = 500) -> float:
    monitor = DriftMonitor(reference, window=window, min_rows=min(window, len(x)))
    monitor.update([x])
    score = monitor.score()
    assert score is not None
    return score


def test_the_test_split_stays_below_the_alert_and_shifted_digits_rise_above_it(split, reference):
    x = np.concatenate([split.x_val, split.x_test])  # 720 digits the model never trained on
    calm = score_of(reference, x)
    assert calm < ALERT_PSI / 4, calm  # measured 0.017
    assert score_of(reference, inverted(x)) > 4 * ALERT_PSI  # measured 5.6
    assert score_of(reference, noisy(x)) > ALERT_PSI  # Gaussian noise, sd 4 of 16: measured 0.44


def test_the_window_slides_back_when_the_inputs_recover(split, reference):
    x = np.concatenate([split.x_val, split.x_test])
    monitor = DriftMonitor(reference, window=300, min_rows=100)
    assert monitor.score() is None  # nothing seen yet: no figure, not a zero
    monitor.update([inverted(x[:300])])
    assert monitor.score() > ALERT_PSI
    for row in x[300:600]:  # one request at a time, as the writer hands them over
        monitor.update([row.reshape(1, 64)])
    assert monitor.score() < ALERT_PSI / 2
    monitor.update([np.zeros((2, 10), dtype=np.float32)])  # another width: skipped, not a crash
    assert monitor.score() < ALERT_PSI / 2


def test_the_window_always_scores_exactly_its_last_rows(split, reference):
    """Batches of any size (one request up to more than the window), mixed shifted and not:
    the figure equals the PSI of a recount of the last `window` rows seen."""
    rng = np.random.default_rng(1)
    x = np.concatenate([split.x_val, split.x_test, inverted(split.x_test)])
    monitor, seen = DriftMonitor(reference, window=250, min_rows=1), np.zeros((0, 64), dtype=np.float32)
    for size in [*rng.integers(1, 60, 30), 400, 3, 250, 1]:
        batch = [x[rng.integers(0, len(x), n)] for n in rng.multinomial(size, [0.5, 0.5]) if n]
        monitor.update(batch)
        seen = np.concatenate([seen, *batch])[-250:]
        recount = DriftReference.from_inputs(seen, *PIXEL_RANGE).counts
        assert monitor.score() == pytest.approx(float(psi(recount, reference.counts).mean()), rel=1e-12)


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift():
    counts = np.array([[50, 30, 20]])
    assert psi(counts, counts)[0] == pytest.approx(0.0)
    assert 0 < psi(np.array([[40, 35, 25]]), counts)[0] < psi(np.array([[10, 30, 60]]), counts)[0]


def test_the_reference_round_trips_and_a_bad_one_is_refused(reference, tmp_path):
    again = DriftReference.from_json(reference.to_json())
    assert (again.counts == reference.counts).all() and again.rows == reference.rows == 1077
    assert DriftReference.load(tmp_path) is None  # a model exported before drift existed
    with pytest.raises(ValueError, match="counts must be"):
        DriftReference.from_json('{"low": 0, "high": 16, "bins": 8, "rows": 1, "counts": [[1, 2]]}')
    bins = reference.bin_index(np.array([[-1.0, 0.0, 15.99, 16.0, 17.0, np.nan]]))
    assert bins.tolist() == [[0, 1, 8, 8, 9, 9]]


def test_shifted_traffic_through_the_listener_raises_the_slots_figure_within_a_minute(tmp_path, split, reference):
    """Real V2 REST requests, one digit each; the prediction log's writer feeds the monitor,
    which reports to the slot's observer (what /metrics publishes)."""
    x = np.concatenate([split.x_val, split.x_test])
    with RedisProcess() as redis:
        observer = RecordingDrift()
        monitor = DriftMonitor(reference, window=300, min_rows=200, observer=observer)
        with logged_server(tmp_path, open_store(redis.url), on_inputs=monitor.update) as server:
            send(server.url, x[:300])
            calm = wait_until(lambda: observer.latest(rows=300), 60, "a drift figure on 300 rows")
            assert calm < ALERT_PSI, calm
            send(server.url, inverted(x[300:600]))
            shifted = wait_until(lambda: observer.latest(rows=300, above=ALERT_PSI), 60, "the drift alert level")
            assert shifted > ALERT_PSI


def send(url: str, x: np.ndarray) -> None:
    """One request per digit, 8 in flight (one at a time waits out the batching window each)."""
    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(8) as pool:

        def post(row: np.ndarray) -> int:
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
            return client.post(INFER, json=body).status_code

        assert set(pool.map(post, x)) == {200}


class RecordingDrift(RecordingObserver):
    def __init__(self) -> None:
        super().__init__()
        self.drift: list[tuple[float, int]] = []

    def input_drift(self, psi: float, rows: int) -> None:
        with self.lock:
            self.drift.append((psi, rows))

    def latest(self, rows: int, above: float = -1.0) -> float | None:
        with self.lock:
            if self.drift and self.drift[-1][1] >= rows and self.drift[-1][0] > above:
                return self.drift[-1][0]
        return None
