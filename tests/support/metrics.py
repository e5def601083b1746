"""Read a server's Prometheus /metrics page into numbers tests can compare."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset(labels.items())): value} for every canary_* sample."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("canary_"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, labelset), value in samples.items() if sample == name and wanted <= labelset)
