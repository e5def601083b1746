"""Ground truth: labels for logged predictions, joined by request id, tallied per version.

The application that asked for a prediction learns the truth later (a user corrects a
digit) and posts it: one `{"id": "<request id>", "label": 3}` or a list of them (a label
is a list of classes when its request carried several rows). `FeedbackDesk.submit` looks
every id up in the prediction log's store, refuses the whole post if any is unknown or
expired (404, naming them) or already has a different label (409), and stores the rest
once: a label posted twice counts once, so a client may safely resend a post.

The join lives in whichever slot nginx sends the post to: every slot reads the same store,
and a label is tallied under the model version that made the prediction, not the one that
took the post. The tallies live in the store (stack-wide, they survive slot restarts);
`refresh` publishes them as the online accuracy and label count of each version.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from service.core.errors import InvalidInput, LabelConflict, PayloadTooLarge, Unavailable, UnknownPrediction
from service.core.observer import CoreObserver
from service.core.request_id import MAX_LENGTH, sane_request_id

log = logging.getLogger("bento_canary.feedback")
MAX_LABELS = 1000  # labels in one post
MAX_BODY_BYTES = 1 << 20  # one post's body (nginx's feedback location has the same limit)
_NAMED = 10  # ids named in an error message; the count says how many more


@dataclass(frozen=True)
class Label:
    request_id: str
    values: tuple[int, ...]  # one class per row of the request


@dataclass(frozen=True)
class LoggedPrediction:
    """What the store keeps about a prediction for the join."""

    model: str
    model_version: str
    slot: str
    classes: tuple[int, ...]
    confidences: tuple[float, ...] = ()  # of the predicted class per row (rows logged before: empty)
    latency_ms: float | None = None


@dataclass(frozen=True)
class JudgedLabel:
    """A label joined to its prediction, ready to store."""

    request_id: str
    model: str
    model_version: str
    slot: str
    values: tuple[int, ...]
    correct: int  # rows whose predicted class equals the label


@dataclass(frozen=True)
class Tally:
    labels: int  # labelled rows
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labels if self.labels else None


class PredictionStore(Protocol):
    """The join's view of the prediction log's store (`service/sinks/`). Calls block and may
    raise on a store fault; `FeedbackDesk` runs them off the event loop and maps failures."""

    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]:
        """Non-shadow predictions of `model` still within the label window, by request id."""
        ...

    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]:
        """Labels already stored for these ids."""
        ...

    def add_labels(self, labels: list[JudgedLabel]) -> int:
        """Store and tally each label unless its id already has one; returns how many were new."""
        ...

    def tallies(self, model: str) -> dict[str, Tally]:
        """Labelled rows and correct rows per model version."""
        ...


@dataclass(frozen=True)
class FeedbackResult:
    accepted: int  # new labels
    duplicates: int  # labels the store already had (not counted again)

    def to_json(self) -> dict[str, int]:
        return {"accepted": self.accepted, "duplicates": self.duplicates}


def _names(ids: list[str]) -> str:
    shown = ", ".join(ids[:_NAMED])
    return shown + (f" and {len(ids) - _NAMED} more" if len(ids) > _NAMED else "")


def _label_values(value: Any, classes: int | None, where: str) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InvalidInput(f"{where}: 'label' must be a class or a non-empty list of classes")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise InvalidInput(f"{where}: a label is a class number (an integer >= 0), got {str(item)[:40]!r}")
        if classes is not None and item >= classes:
            raise InvalidInput(f"{where}: label {item} is not a class of this model (0-{classes - 1})")
    return tuple(items)


def labels_from(payload: Any, classes: int | None) -> list[Label]:
    """Validate a decoded feedback body: one `{"id", "label"}` object or a list of 1-1000.
    The same id twice with the same label counts once; with different labels it is refused."""
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise InvalidInput('feedback must be {"id": ..., "label": ...} or a non-empty list of them')
    if len(items) > MAX_LABELS:
        raise PayloadTooLarge(f"{len(items)} labels in one post; at most {MAX_LABELS}")
    seen: dict[str, tuple[int, ...]] = {}
    for index, item in enumerate(items):
        where = f"feedback[{index}]"
        if not isinstance(item, dict) or set(item) != {"id", "label"}:
            raise InvalidInput(f'{where} must be an object with exactly "id" and "label"')
        request_id = item["id"]
        if not isinstance(request_id, str) or sane_request_id(request_id) != request_id:
            raise InvalidInput(f"{where}: 'id' must be a request id (1-{MAX_LENGTH} of A-Z a-z 0-9 . _ : -)")
        values = _label_values(item["label"], classes, where)
        if seen.setdefault(request_id, values) != values:
            raise InvalidInput(f"{where}: id {request_id} appears twice with different labels")
    return [Label(request_id, values) for request_id, values in seen.items()]


class FeedbackDesk:
    """Joins labels to logged predictions of `model` and keeps the tallies current.

    The log writes an answer a flush interval or so after it went out (longer on a loaded
    machine), so `post` looks ids it cannot find up again for `settle_s` before it refuses:
    a label posted right after its answer is not lost to the writer's lag."""

    RETRY_S = 0.25  # between lookups while ids settle
    MAX_SETTLING = 4  # posts waiting for ids at once; beyond, an unknown id is refused at once

    def __init__(
        self, store: PredictionStore, model: str, observer: CoreObserver | None = None, *, settle_s: float = 0.0
    ) -> None:
        self.store, self.model, self.settle_s = store, model, settle_s
        self.observer = observer or CoreObserver()
        self._settling = 0

    async def post(self, labels: list[Label]) -> FeedbackResult:
        """`submit` on a worker thread, again while ids are unknown, for at most `settle_s`
        (and for at most `MAX_SETTLING` posts at once: a backfill of expired ids must not
        hold every slot of the server's feedback posts)."""
        try:
            return await asyncio.to_thread(self.submit, labels)
        except UnknownPrediction:
            if self.settle_s <= 0 or self._settling >= self.MAX_SETTLING:
                raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_s
        self._settling += 1
        try:
            while True:
                await asyncio.sleep(self.RETRY_S)
                try:
                    return await asyncio.to_thread(self.submit, labels)
                except UnknownPrediction:  # nothing was recorded: trying again is safe
                    if loop.time() + self.RETRY_S > deadline:
                        raise
        finally:
            self._settling -= 1

    def submit(self, labels: list[Label]) -> FeedbackResult:
        """Blocking (store round trips): call it from a worker thread."""
        ids = [label.request_id for label in labels]
        try:
            found = self.store.lookup(self.model, ids)
            unknown = [i for i in ids if i not in found]
            if unknown:
                raise UnknownPrediction(
                    f"unknown or expired prediction id(s) {_names(unknown)}: nothing was recorded; "
                    "post labels only for answered requests, within the label window"
                )
            judged = [self._judge(label, found[label.request_id]) for label in labels]
            stored = self.store.labels_of(ids)
            conflicts = [j.request_id for j in judged if j.request_id in stored and stored[j.request_id] != j.values]
            if conflicts:
                raise LabelConflict(f"prediction id(s) {_names(conflicts)} already have a different label: "
                                    "nothing was recorded")  # fmt: skip
            fresh = [j for j in judged if j.request_id not in stored]
            added = self.store.add_labels(fresh) if fresh else 0
        except (UnknownPrediction, LabelConflict, InvalidInput):
            raise
        except Exception as exc:  # the store is down or misbehaving: retry later, never a 500
            log.warning("feedback: the prediction log store failed (%s: %s)", type(exc).__name__, exc)
            raise Unavailable("the prediction log store is unreachable; retry later") from None
        for version in {j.model_version for j in fresh}:
            self.observer.feedback(version, sum(1 for j in fresh if j.model_version == version))
        result = FeedbackResult(added, len(labels) - added)
        self._publish_quietly()
        return result

    def _judge(self, label: Label, logged: LoggedPrediction) -> JudgedLabel:
        if len(label.values) != len(logged.classes):
            raise InvalidInput(
                f"prediction {label.request_id} answered {len(logged.classes)} row(s); "
                f"its label must have as many classes, got {len(label.values)}"
            )
        correct = sum(1 for given, predicted in zip(label.values, logged.classes, strict=True) if given == predicted)
        return JudgedLabel(label.request_id, logged.model, logged.model_version, logged.slot, label.values, correct)

    def refresh(self) -> dict[str, Tally]:
        """Read the tallies from the store and publish them (raises on a store fault)."""
        tallies = self.store.tallies(self.model)
        for version, tally in tallies.items():
            self.observer.online_accuracy(version, tally.labels, tally.correct)
        return tallies

    def _publish_quietly(self) -> None:
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - the labels are stored; the gauges catch up on the next refresh
            log.debug("refreshing the online accuracy failed", exc_info=True)
