"""The gate's human-readable report: PNG plots and a `report.md` that embeds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

from loadtest.gate import GateVerdict
from loadtest.samples import SampleBook
from loadtest.targets import ROLES

COLORS = {"stable": "tab:blue", "candidate": "tab:orange"}
STYLES = {"stable": "-", "candidate": "--"}  # dashed: a candidate on top of stable stays visible


def plot_latency(book: SampleBook, path: Path) -> Path:
    """Latency distribution per slot: histogram (log scale) and empirical CDF."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    hist, cdf = fig.subplots(1, 2)
    per_slot = {slot: np.sort([s.latency_ms for s in book.samples if s.slot == slot and s.ok]) for slot in ROLES}
    everything = np.concatenate([v for v in per_slot.values() if v.size] or [np.array([1.0])])
    low, high = max(everything.min(), 0.05), max(everything.max(), everything.min() * 1.01, 0.1)
    bins = np.geomspace(low, high, 60)
    for slot, values in per_slot.items():
        if not values.size:
            continue
        hist.hist(values, bins=bins, alpha=0.5, color=COLORS[slot], label=f"{slot} (n={values.size})")
        cdf.plot(values, np.arange(1, values.size + 1) / values.size, color=COLORS[slot], label=slot)
        for q, style in ((50, ":"), (95, "--")):
            cdf.axvline(np.percentile(values, q), color=COLORS[slot], linestyle=style, linewidth=0.8)
    for ax in (hist, cdf):
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, successful requests)")
        ax.legend()
    hist.set_ylabel("requests")
    hist.set_title("Latency distribution per slot")
    cdf.set_ylabel("share of requests")
    cdf.set_title("CDF (dotted p50, dashed p95)")
    fig.savefig(path, dpi=100)
    return path


def plot_timeline(book: SampleBook, path: Path) -> Path:
    """Throughput, errors and median latency per second over the gate's window, per slot."""
    fig = Figure(figsize=(14, 4), layout="constrained")
    rate, errors, latency = fig.subplots(1, 3, sharex=True)
    start, _ = book.window()
    for slot in ROLES:
        seconds, ok, failed = book.timeline(slot)
        style = {"color": COLORS[slot], "label": slot, "linestyle": STYLES[slot], "where": "post"}
        rate.step(seconds, ok, **style)
        errors.step(seconds, failed, **style)
        good = [s for s in book.samples if s.slot == slot and s.ok]
        buckets: dict[int, list[float]] = {}
        for s in good:
            buckets.setdefault(int(s.ended - start), []).append(s.latency_ms)
        ticks = sorted(buckets)
        medians = [np.median(buckets[t]) for t in ticks]
        latency.plot(ticks, medians, color=COLORS[slot], linestyle=STYLES[slot], label=slot)
    rate.set_title("Answered requests per second")
    errors.set_title("Failed requests per second")
    latency.set_title("Median latency per second (ms)")
    errors.set_ylim(top=max(1.0, errors.get_ylim()[1]))
    for ax in (rate, errors, latency):
        ax.set_xlabel("seconds since the load started")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.savefig(path, dpi=100)
    return path


def _cell(value: Any, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{unit}"


def write_markdown(path: Path, result: dict[str, Any], verdict: GateVerdict, plots: list[Path]) -> Path:
    slots = result["slots"]
    lines = [
        f"# Promotion gate: {verdict.verdict.upper()}",
        "",
        verdict.summary,
        "",
        f"Load: {result['config']['users']} users, {result['config']['duration_s']:.0f} s, "
        f"protocols {result['config']['protocols']}; thresholds `{result['config']['thresholds']}`.",
        "",
        "| slot | target | requests | failed | error ratio | p50 ms | p95 ms | p99 ms | answered/s | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for slot in ROLES:
        s = slots[slot]
        cells = [
            slot, f"`{s['target']['rest']}`", s["requests"], s["failures"], _cell(s["error_ratio"], 100, 2, "%"),
            _cell(s["p50_ms"]), _cell(s["p95_ms"]), _cell(s["p99_ms"]), _cell(s["throughput_rps"], digits=1),
            _cell(s["accuracy"], 100, 2, "%"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| check | value | limit | result | detail |", "|---|---:|---:|---|---|"]
    for c in verdict.checks:
        value = "n/a" if c.value is None else f"{c.value:.4g}"
        lines.append(f"| {c.name} | {value} | {c.limit:g} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |")
    lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")
    return path
