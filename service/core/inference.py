"""`InferenceCore`: the transport-free heart of the service.

It validates a request against the `ModelCard`, looks its answer up in the response cache,
sends a miss through the shared adaptive batcher (one per worker, fed by every protocol),
stores fresh answers to the cache once per batch, and answers in the same transport-free
types. The BentoML, V2 REST and V2 gRPC adapters only translate.

The cache lookup is a stage of its own, before the model's queue: requests that arrive
together are looked up with one MGET on a thread of their own, so a hit is answered while a
model call runs and never waits behind one (a miss then joins the model's queue).

A cached answer is served only if its seal verifies (HMAC with the deployment's cache key)
and it is what this request asks for: one array per requested output, with the card's dtype
and shape and the request's row count. Anything else is a miss, counted by reason.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.core.batching import AdaptiveBatcher
from service.core.cache import (
    NullCache,
    RejectedEntry,
    ResponseCache,
    cache_key,
    decode_arrays,
    encode_arrays,
    seal,
    unseal,
)
from service.core.errors import InvalidInput, ModelNotFound, PayloadTooLarge, Unavailable
from service.core.faults import FaultPlan
from service.core.model import ModelCard
from service.core.observer import CoreObserver
from service.core.predlog import Prediction, PredictionLog, RequestTrace
from service.core.runner import OnnxRunner
from service.core.tensors import V2_TO_NUMPY, InferRequest, InferResponse, InferTensor, TensorSpec, v2_datatype

log = logging.getLogger("bento_canary.core")


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64  # rows per model call
    max_latency_ms: float = 2.0  # longest a request waits for companions
    max_queue_rows: int = 4096  # beyond this, 503 / UNAVAILABLE


@dataclass(frozen=True)
class Classification:
    classes: list[int]
    confidences: list[float]


@dataclass(eq=False)
class _Job:
    """One validated request on its way through the batcher."""

    feed: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    use_cache: bool = True
    key: str = ""  # its cache key, once the lookup stage computed it
    # per row, set on the batch thread for the prediction log (empty without one)
    classes: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)


class InferenceCore:
    def __init__(
        self,
        runner: OnnxRunner,
        max_rows_per_request: int = 1024,
        *,
        batching: BatchingConfig | None = None,
        cache: ResponseCache | None = None,
        cache_secret: bytes | None = None,
        observer: CoreObserver | None = None,
        faults: FaultPlan | None = None,
        predlog: PredictionLog | None = None,
    ) -> None:
        self.runner = runner
        self.card: ModelCard = runner.card
        self.max_rows = max_rows_per_request
        self.cache: ResponseCache = cache or NullCache()
        # With the cache off, skip the sha256 of every request's inputs on the hot path.
        self._caching = not isinstance(self.cache, NullCache)
        if self._caching and not cache_secret:
            log.info("no cache signing key configured: this process signs with its own, entries are not shared")
        # Without a deployment key, a per-process one: entries stay authenticated, just unshared.
        self._cache_secret = cache_secret or secrets.token_bytes(32)
        self._warned_uncacheable = False
        self.observer = observer or CoreObserver()
        self.faults = faults or FaultPlan()
        self.predlog = predlog  # None: no prediction log
        if self.faults.active:
            log.warning("FAULT INJECTION ACTIVE: %s", self.faults)
        config = batching or BatchingConfig()
        self.batcher: AdaptiveBatcher[_Job, list[np.ndarray]] = AdaptiveBatcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_latency_ms=config.max_latency_ms,
            max_queue_rows=config.max_queue_rows,
            on_batch=self._on_batch,
            on_reject=self.observer.rejected,
        )
        # The cache lookup stage: whatever queued while the last MGET ran goes in the next one.
        self.lookups: AdaptiveBatcher[_Job, list[np.ndarray] | None] = AdaptiveBatcher(
            self._look_up,
            max_batch_size=max(256, config.max_batch_size),
            max_latency_ms=0.0,
            max_queue_rows=config.max_queue_rows,
            on_reject=self.observer.rejected,
        )
        self.ready = False
        # Whether the other workers of the slot are ready too (service.workers); one worker: yes.
        self.peers_ready: Callable[[], bool] = lambda: True

    def is_ready(self) -> bool:
        """Readiness as probes see it: this worker warmed up and every sibling worker too.
        (`ready` alone decides whether this worker takes requests.)"""
        return self.ready and self.peers_ready()

    def start(self) -> None:
        """Warm up, then turn ready: readiness means the first request will be fast."""
        self.runner.warm_up()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.lookups.close()
        await self.batcher.close()

    @property
    def max_input_elements(self) -> int | None:
        """The most values one input may hold: the row limit times the largest row of the
        card's inputs. The codecs refuse a bigger shape before converting anything; None
        when a non-batch dimension is variable."""
        rows = []
        for spec in self.card.inputs:
            if any(d < 0 for d in spec.shape[1:]):
                return None
            rows.append(math.prod(spec.shape[1:]))
        return self.max_rows * max(rows, default=1)

    # -- identity ------------------------------------------------------------------------
    def check_model(self, name: str, version: str | None = None) -> None:
        if name != self.card.name:
            raise ModelNotFound(f"unknown model {name!r}; this server serves {self.card.name!r}")
        if version not in (None, "", self.card.version):
            raise ModelNotFound(
                f"unknown version {version!r} of model {name!r}; this server serves version {self.card.version}"
            )

    # -- validation ----------------------------------------------------------------------
    def validate(self, request: InferRequest) -> _Job:
        """Check a request against the card; a client mistake never reaches the batcher."""
        self.check_model(request.model_name, request.model_version)
        if not self.ready:
            raise Unavailable("model is not ready yet")
        declared = {spec.name: spec for spec in self.card.inputs}
        given = [t.name for t in request.inputs]
        if sorted(given) != sorted(declared) or len(set(given)) != len(given):
            raise InvalidInput(f"inputs must be exactly {sorted(declared)}, got {given}")
        feed = {t.name: self._check_tensor(t, declared[t.name]) for t in request.inputs}
        rows = {array.shape[0] for array in feed.values()}
        if len(rows) != 1:
            raise InvalidInput(f"all inputs must have the same number of rows, got {sorted(rows)}")
        outputs = request.outputs or [o.name for o in self.card.outputs]
        unknown = [name for name in outputs if self.card.output_spec(name) is None]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; the model has {[o.name for o in self.card.outputs]}")
        # Request parameter "cache": false skips the response cache (the promotion gate uses
        # it, so a warm stable is never compared with a cold candidate).
        use_cache = self._caching and request.parameters.get("cache", True) is not False
        return _Job(feed, tuple(dict.fromkeys(outputs)), rows.pop(), use_cache)

    def _check_tensor(self, tensor: InferTensor, spec: TensorSpec) -> np.ndarray:
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype}")
        shape = tuple(tensor.shape)
        if len(shape) != len(spec.shape) or any(d != s for d, s in zip(shape, spec.shape, strict=True) if s != -1):
            raise InvalidInput(f"input {tensor.name!r} must have shape {list(spec.shape)}, got {list(shape)}")
        rows = shape[0] if shape else 0
        if rows < 1:
            raise InvalidInput(f"input {tensor.name!r} is an empty batch")
        if rows > self.max_rows:
            raise PayloadTooLarge(f"input {tensor.name!r} has {rows} rows; the limit is {self.max_rows}")
        data = tensor.data
        expected = math.prod(shape)
        if data.size != expected:
            raise InvalidInput(f"input {tensor.name!r} has {data.size} values, shape {list(shape)} needs {expected}")
        data = data.reshape(shape)
        if self.card.input_range is None:
            if data.dtype.kind == "f" and not np.isfinite(data).all():
                raise InvalidInput(f"input {tensor.name!r} contains NaN or Inf")
            return np.ascontiguousarray(data)
        # Two reductions instead of three on the hot path: a NaN makes min and max NaN, an
        # Inf makes one of them infinite, so finiteness is read off the extremes.
        low, high = self.card.input_range
        smallest, largest = data.min(), data.max()
        if data.dtype.kind == "f" and not (math.isfinite(smallest) and math.isfinite(largest)):
            raise InvalidInput(f"input {tensor.name!r} contains NaN or Inf")
        if smallest < low or largest > high:
            raise InvalidInput(f"input {tensor.name!r} values must lie in [{low:g}, {high:g}]")
        return np.ascontiguousarray(data)

    # -- the batch function (runs on the batcher's thread) --------------------------------
    def _run_batch(self, jobs: list[_Job]) -> list[list[np.ndarray] | BaseException]:
        results: list[list[np.ndarray] | BaseException | None] = [None] * len(jobs)
        # Requests asking for the same outputs share one model call.
        groups: dict[tuple[str, ...], list[int]] = {}
        for index in range(len(jobs)):
            groups.setdefault(jobs[index].outputs, []).append(index)
        fresh: list[tuple[str, bytes]] = []
        for outputs, members in groups.items():
            feed = {
                name: np.concatenate([jobs[i].feed[name] for i in members])
                if len(members) > 1
                else jobs[members[0]].feed[name]
                for name in jobs[members[0]].feed
            }
            self.faults.slow_down()
            arrays = self.runner.run(feed, list(outputs))
            bounds = np.cumsum([0, *(jobs[i].rows for i in members)])
            for position, index in enumerate(members):
                own = [array[bounds[position] : bounds[position + 1]] for array in arrays]
                results[index] = own
                job = jobs[index]
                if job.use_cache and self._cacheable(own, job):
                    key = job.key or self._key(job)
                    fresh.append((key, seal(self._cache_secret, key, encode_arrays(own))))
        if fresh:
            self.cache.put_many(fresh)
        try:
            self._observe_predictions(jobs, results)
        except Exception:  # metrics must never fail a batch
            log.exception("observing the batch's predictions failed")
        return results  # type: ignore[return-value]

    # -- the response cache (the lookup stage's thread, and the batch thread's puts) ------
    def _key(self, job: _Job) -> str:
        card = self.card
        return cache_key(card.name, card.version, card.sha256, job.feed, job.outputs)

    def _look_up(self, jobs: list[_Job]) -> list[list[np.ndarray] | BaseException | None]:
        """The lookup stage's batch function: each job's cached answer, or None (a miss, for
        the model's queue). The hits' predictions are observed here, as a batch's are."""
        for job in jobs:
            job.key = self._key(job)
        answers = self._cached_answers(jobs, [job.key for job in jobs])
        hits = [i for i, answer in enumerate(answers) if answer is not None]
        if hits:
            try:
                self._observe_predictions([jobs[i] for i in hits], [answers[i] for i in hits])
            except Exception:  # metrics must never fail a lookup
                log.exception("observing the cached answers' predictions failed")
        return list(answers)

    def _cached_answers(self, jobs: list[_Job], keys: list[str]) -> list[list[np.ndarray] | None]:
        """Per job, its cached answer if one is there and passes `_accept`, else None.
        Counts hits, misses and rejections; a rejected entry is a miss, never an error."""
        cached = [i for i, job in enumerate(jobs) if job.use_cache]
        answers: list[list[np.ndarray] | None] = [None] * len(jobs)
        if not cached:
            return answers
        rejected: Counter[str] = Counter()
        for index, blob in zip(cached, self.cache.get_many([keys[i] for i in cached]), strict=True):
            if blob is None:
                continue
            try:
                answers[index] = self._accept(keys[index], blob, jobs[index])
            except RejectedEntry as exc:
                rejected[exc.reason] += 1
                log.warning("cache entry %s rejected (%s: %s); treated as a miss", keys[index], exc.reason, exc)
        hits = sum(answer is not None for answer in answers)
        for kind, count in (("hit", hits), ("miss", len(cached) - hits)):
            if count:
                self.observer.cache_event(kind, count)
        for reason, count in rejected.items():
            self.observer.cache_rejected(reason, count)
        return answers

    def _accept(self, key: str, blob: bytes, job: _Job) -> list[np.ndarray]:
        """The arrays in `blob` if its seal verifies for `key` and they answer `job`; else RejectedEntry."""
        payload = unseal(self._cache_secret, key, blob)
        try:
            arrays = decode_arrays(payload)
        except ValueError as exc:  # sealed by us yet unreadable: a bug or a leaked key, never served
            raise RejectedEntry("format", str(exc)) from None
        if problem := self._answer_problem(arrays, job):
            raise RejectedEntry("mismatch", problem)
        return arrays

    def _answer_problem(self, arrays: list[np.ndarray], job: _Job) -> str | None:
        """Why `arrays` is not an answer to `job` per the card (count, dtype, shape, rows), or None."""
        if len(arrays) != len(job.outputs):
            return f"{len(arrays)} arrays for outputs {list(job.outputs)}"
        for name, array in zip(job.outputs, arrays, strict=True):
            spec = self.card.output_spec(name)
            if spec is None or array.dtype != V2_TO_NUMPY.get(spec.datatype):
                return f"output {name!r} is {array.dtype}, the card says {spec.datatype if spec else 'nothing'}"
            fixed = all(d == want for d, want in zip(array.shape[1:], spec.shape[1:], strict=False) if want != -1)
            if array.ndim != len(spec.shape) or array.ndim == 0 or array.shape[0] != job.rows or not fixed:
                return f"output {name!r} has shape {list(array.shape)}; want {job.rows} rows of {list(spec.shape)}"
        return None

    def _cacheable(self, arrays: list[np.ndarray], job: _Job) -> bool:
        """Store only what `_accept` would serve: a model straying from its card must not fill
        the cache with entries every lookup rejects. Warned once."""
        problem = self._answer_problem(arrays, job)
        if problem and not self._warned_uncacheable:
            self._warned_uncacheable = True
            log.warning("model answers do not match the card (%s); such answers are not cached", problem)
        return problem is None

    def _on_batch(self, rows: int, items: int, seconds: float) -> None:
        self.observer.batch(rows, items, seconds)
        self.observer.queue_depth(self.batcher.queue_rows)

    # -- inference -----------------------------------------------------------------------
    async def infer(self, request: InferRequest, trace: RequestTrace | None = None) -> InferResponse:
        """Answer `request`; with a `trace` (the adapters give one) the answer is also offered
        to the prediction log, keyed by the trace's request id."""
        job = self.validate(request)
        self.faults.maybe_fail()
        arrays = await self.lookups.submit(job, job.rows) if job.use_cache else None
        if arrays is None:
            arrays = await self.batcher.submit(job, job.rows)
        tensors = [
            InferTensor(name, v2_datatype(array), tuple(array.shape), array)
            for name, array in zip(job.outputs, arrays, strict=True)
        ]
        if trace is not None and self.predlog is not None:
            self._log(job, trace)
        return InferResponse(self.card.name, self.card.version, request.id, tensors)

    def _log(self, job: _Job, trace: RequestTrace) -> None:
        """Hand the answer to the prediction log: no hashing or copying here (the writer does it)."""
        spec = self.card.inputs[0]
        prediction = Prediction(
            trace.request_id, time.time(), trace.protocol, trace.shadow, time.perf_counter() - trace.started,
            job.feed[spec.name], spec.datatype, job.classes, job.confidences,
        )  # fmt: skip
        self.predlog.offer(prediction)  # type: ignore[union-attr]

    def _observe_predictions(self, jobs: list[_Job], results: list) -> None:
        """Class mix and confidence of every answered row (cached ones too), once per batch:
        one softmax over the batch instead of one per request on the event loop."""
        name = self.card.scores_output
        scores = [
            result[job.outputs.index(name)]
            for job, result in zip(jobs, results, strict=True)
            if name in job.outputs and not isinstance(result, BaseException)
        ]
        if not scores:
            return
        probabilities = self.probabilities(np.concatenate(scores) if len(scores) > 1 else scores[0])
        classes, confidences = probabilities.argmax(1).tolist(), probabilities.max(1).tolist()
        self.observer.predictions(classes, confidences)
        if self.predlog is not None:  # each job's own rows, for its log record
            start = 0
            for job, result in zip(jobs, results, strict=True):
                if name in job.outputs and not isinstance(result, BaseException):
                    job.classes, job.confidences = (
                        classes[start : start + job.rows],
                        confidences[start : start + job.rows],
                    )
                    start += job.rows

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        return softmax(scores) if self.card.scores_kind == "logits" else scores

    async def classify(self, pixels: np.ndarray, trace: RequestTrace | None = None) -> Classification:
        """Class and confidence per row: the convenience the native API offers."""
        spec = self.card.inputs[0]
        if pixels.ndim != 2:
            raise InvalidInput(f"pixels must be a list of rows of {spec.shape[-1]} numbers")
        request = InferRequest(
            self.card.name, None,
            [InferTensor(spec.name, "FP32", tuple(pixels.shape), pixels.astype(np.float32, copy=False).reshape(-1))],
            [self.card.scores_output],
        )  # fmt: skip
        probabilities = self.probabilities((await self.infer(request, trace)).outputs[0].data)
        return Classification(probabilities.argmax(1).astype(int).tolist(), probabilities.max(1).astype(float).tolist())


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
