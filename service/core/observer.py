"""What the core reports while it works. The core calls these; `service.metrics` implements
them with Prometheus, tests may record them. The default does nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.core.shadow_compare import ShadowTally


class CoreObserver:
    """No-op base: override what you need. Calls come from the event loop or the batch thread."""

    def request(self, protocol: str, status: str, seconds: float) -> None:
        """An inference request finished at an adapter (status: HTTP code or gRPC code name)."""

    def batch(self, rows: int, items: int, seconds: float) -> None:
        """A batch of `items` requests holding `rows` rows ran through the model."""

    def queue_depth(self, rows: int) -> None:
        """Rows waiting for the model right now."""

    def rejected(self) -> None:
        """A request was refused because the queue was full (503 / UNAVAILABLE)."""

    def cache_event(self, kind: str, count: int) -> None:
        """Cache outcome counts: kind is hit, miss, error or skip."""

    def cache_rejected(self, reason: str, count: int) -> None:
        """Cache entries refused (and counted as misses): reason is signature (forged, or
        sealed with another key), format (undecodable) or mismatch (not this request's answer)."""

    def predictions(self, classes: Sequence[int], confidences: Sequence[float]) -> None:
        """Predicted classes and their confidences, per answered row."""

    def prediction_log(self, written: int, dropped: dict[str, int], buffered: int) -> None:
        """One prediction-log writer cycle: rows written, records dropped by reason
        (buffer_full, sink), records still buffered."""

    def feedback(self, version: str, labels: int) -> None:
        """`labels` new labels were stored for predictions of model `version`."""

    def online_accuracy(self, version: str, labels: int, correct: int) -> None:
        """The store's tally for model `version`: labelled rows and correct ones."""

    def input_drift(self, psi: float, rows: int) -> None:
        """Mean PSI over features of the last `rows` input rows against the model's training
        inputs (`service.core.drift`)."""

    def shadow_compared(self, tallies: list[ShadowTally]) -> None:
        """Shadow copies this slot answered, compared with stable's answers to the same
        requests (`service.core.shadow_compare`), summed per stable version."""

    def shadow_unmatched(self, copies: int) -> None:
        """Shadow copies for which stable's answer never showed in the log (or had other rows)."""
