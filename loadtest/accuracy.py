"""`AccuracyBook`: right and wrong predictions per request name, next to Locust's statistics.

Locust counts requests, failures and latency; a load test of a model should also say whether
the answers were right. The load-test users keep each digit's label and count the answer
here, per request name (protocol, slot, model version), so a slot that answers fast but
wrong shows up. A wrong prediction is not a failed request (the model is allowed to err);
it lowers that name's accuracy. Workers ship their counts to the master with their stats.
No Locust here.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


class AccuracyBook:
    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [right, answered]

    def add(self, name: str, label: int, predicted: int) -> None:
        entry = self.counts[name]
        entry[0] += int(predicted == label)
        entry[1] += 1

    def drain(self) -> dict[str, list[int]]:
        """The counts since the last drain (what a worker sends its master), then empty."""
        counts = {name: list(entry) for name, entry in self.counts.items()}
        self.counts.clear()
        return counts

    def merge(self, counts: dict[str, list[int]]) -> None:
        for name, (right, answered) in counts.items():
            entry = self.counts[name]
            entry[0] += int(right)
            entry[1] += int(answered)

    def rows(self) -> list[tuple[str, int, int, float]]:
        """(name, right, answered, accuracy) per name, sorted by name."""
        return [(name, right, total, right / total) for name, (right, total) in sorted(self.counts.items()) if total]

    def table(self) -> str:
        lines = [f"{'accuracy of the answers':<40} {'right':>8} {'answered':>9} {'accuracy':>9}"]
        lines += [f"{name:<40} {right:>8} {total:>9} {share:>9.2%}" for name, right, total, share in self.rows()]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Name", "Right", "Answered", "Accuracy"])
            writer.writerows((name, right, total, f"{share:.4f}") for name, right, total, share in self.rows())
