"""Statistics for verdicts on live traffic, where stable and the candidate answer different
requests (unpaired), so a figure's sampling noise must be judged, not only its size.

Accuracy: the drop (stable minus candidate) is a non-inferiority question with the thresholds
file's `max_accuracy_drop_pp` as margin. With a one-sided (1 - alpha) confidence interval of
the difference of two proportions (Agresti-Caffo: one success and one failure added to each
side, so 0/n and n/n stay honest), the drop is
- beyond the margin (fail) when even the interval's lower end exceeds it,
- within the margin (pass) when even its upper end stays at or below it,
- undecided otherwise, and the labels still needed follow from how far the estimate sits from
  the margin: the interval narrows with the square root of the labels.

Paired accuracy (the same inputs answered by both, as in a replay or the shadow gate): only
the discordant pairs carry information, so a drop is real when McNemar's exact test says so:
of the b + c rows where exactly one side is right, stable alone right (b) in more than half by
more than chance (one-sided binomial).

Error ratio: an increase fails only when it is larger than `max_error_ratio_increase` and
Fisher's exact test (one-sided) says it is not chance: a handful of errors on a few hundred
requests does not fail a candidate whose stable made none by luck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import binomtest, fisher_exact, norm

LIVE_ALPHA = 0.05  # one-sided; a live verdict is re-run as labels arrive, so 95% is the bar
MORE_CAP = 10_000_000  # "needs more than this": the estimate sits on the margin


@dataclass(frozen=True)
class DropEstimate:
    """Accuracy drop (stable minus candidate, as a fraction) with its one-sided bounds."""

    drop: float
    lower: float
    upper: float
    se: float
    margin: float
    z: float

    @property
    def state(self) -> str:
        """'fail' (surely beyond the margin), 'pass' (surely within) or 'undecided'."""
        if self.lower > self.margin:
            return "fail"
        if self.upper <= self.margin:
            return "pass"
        return "undecided"

    def scale_needed(self) -> float:
        """By how much both label counts must grow for the interval to clear the margin, if
        the accuracies stay as measured (>= 1; inf when the estimate sits on the margin)."""
        gap = abs(self.drop - self.margin)
        if gap == 0:
            return math.inf
        return max(1.0, (self.z * self.se / gap) ** 2)


def accuracy_drop(
    correct_stable: int, labelled_stable: int, correct_candidate: int, labelled_candidate: int,
    margin: float, alpha: float = LIVE_ALPHA,
) -> DropEstimate:  # fmt: skip
    """Agresti-Caffo interval of p_stable - p_candidate, one-sided at `alpha` each way."""
    ps = (correct_stable + 1) / (labelled_stable + 2)
    pc = (correct_candidate + 1) / (labelled_candidate + 2)
    se = math.sqrt(ps * (1 - ps) / (labelled_stable + 2) + pc * (1 - pc) / (labelled_candidate + 2))
    z = float(norm.ppf(1 - alpha))
    drop = ps - pc
    return DropEstimate(drop, drop - z * se, drop + z * se, se, margin, z)


def error_increase_p(errors_candidate: int, requests_candidate: int, errors_stable: int, requests_stable: int) -> float:
    """One-sided Fisher exact p-value of 'the candidate fails more often than stable'."""
    table = [
        [errors_candidate, requests_candidate - errors_candidate],
        [errors_stable, requests_stable - errors_stable],
    ]
    return float(fisher_exact(table, alternative="greater").pvalue)


def mcnemar_p(stable_only_right: int, candidate_only_right: int) -> float:
    """One-sided exact McNemar p-value of 'the candidate is wrong more often than stable', from
    the discordant pairs (1.0 when there are none)."""
    discordant = stable_only_right + candidate_only_right
    if not discordant:
        return 1.0
    return float(binomtest(stable_only_right, discordant, 0.5, alternative="greater").pvalue)
