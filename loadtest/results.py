"""Turn a finished gate run into its files: `result.json`, plots and `report.md`.

`result.json` is the contract between the Locust process and `run_gate`: the verdict, its
checks, per-slot (and per-protocol) figures with the commonest failure messages (e.g.
"answered by slot blue (version 2), sent to green (version 3)"), each target (its slot and
model version; secret header values masked), the configuration, the exit code and the paths
of the report files. A harness error writes the same file with verdict "error".
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

from loadtest.gate import GateThresholds, GateVerdict, decide
from loadtest.report import plot_latency, plot_timeline, write_markdown
from loadtest.samples import Sample, SampleBook
from loadtest.targets import ROLES, Target

RESULT_FILE = "result.json"
SAMPLES_FILE = "samples.csv"
EXIT_PASS, EXIT_FAIL, EXIT_HARNESS = 0, 1, 2
ERROR = "error"  # the verdict recorded when the gate itself could not run
MAX_REASONS = 10  # failure messages kept per slot in result.json


@dataclass(frozen=True)
class RunConfig:
    users: int
    spawn_rate: float
    protocols: str
    thresholds: str
    model: str
    timeout_s: float = 10.0
    hang_after_s: float = 2.0  # see `loadtest.samples.hang_after_s`
    force_token: bool = False  # whether one was sent (never its value)


def exit_code_for(verdict: GateVerdict) -> int:
    """0 promote; 1 thresholds breached, inconclusive included (never promote on too little)."""
    return EXIT_PASS if verdict.passed else EXIT_FAIL


def per_protocol(book: SampleBook) -> dict[str, dict[str, dict[str, float | int]]]:
    """Requests, failures and median latency per slot and protocol (diagnosis only)."""
    import numpy as np

    table: dict[str, dict[str, dict[str, float | int]]] = {slot: {} for slot in ROLES}
    for slot in ROLES:
        counted = book.counted(slot)
        for protocol in sorted({s.protocol for s in counted}):
            mine = [s for s in counted if s.protocol == protocol]
            good = [s.latency_ms for s in mine if s.ok]
            table[slot][protocol] = {
                "requests": len(mine),
                "failures": len(mine) - len(good),
                "p50_ms": float(np.median(good)) if good else float("nan"),
            }
    return table


def finish_gate(
    book: SampleBook, targets: dict[str, Target], thresholds: GateThresholds, config: RunConfig, out_dir: Path
) -> tuple[GateVerdict, dict[str, Any]]:
    """Decide, then write result.json, the plots and report.md into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {slot: book.slot_stats(slot) for slot in ROLES}
    verdict = decide(stats["stable"], stats["candidate"], thresholds)
    plots = [plot_latency(book, out_dir / "latency.png"), plot_timeline(book, out_dir / "timeline.png")]
    start, stop = book.window()
    result: dict[str, Any] = {
        **verdict.to_dict(),
        "exit_code": exit_code_for(verdict),
        "error": None,
        "slots": {
            slot: {
                **stats[slot].summary(),
                "target": targets[slot].describe(),
                "failure_reasons": dict(book.failure_reasons(slot).most_common(MAX_REASONS)),
            }
            for slot in ROLES
        },
        # inputs dropped from both slots: still open, and not yet hung, when the load stopped
        "inputs_cut_at_stop": len(book.cut),
        "per_protocol": per_protocol(book),
        "config": {**asdict(config), "duration_s": stop - start, "thresholds_values": asdict(thresholds)},
        "started_at": start,
        "report": str((out_dir / "report.md").resolve()),
        "samples": str((out_dir / SAMPLES_FILE).resolve()),
        "plots": [str(p.resolve()) for p in plots],
    }
    write_samples(book, out_dir / SAMPLES_FILE)
    write_markdown(out_dir / "report.md", result, verdict, plots)
    _write(out_dir, result)
    return verdict, result


def write_samples(book: SampleBook, path: Path) -> Path:
    """Every request the verdict is based on, one CSV row each (to re-check a verdict)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f.name for f in fields(Sample)])
        writer.writerows(astuple(sample) for sample in book.samples)
    return path


def write_error(out_dir: Path, message: str) -> Path:
    """Record that the gate could not run (exit code 2), with the reason."""
    summary = f"{ERROR}: {message}"
    result = {"verdict": ERROR, "summary": summary, "checks": [], "exit_code": EXIT_HARNESS, "error": message}
    return _write(out_dir, result)


def _write(out_dir: Path, result: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULT_FILE
    # NaN and infinities are not JSON: write null instead, so any JSON reader can load it.
    path.write_text(json.dumps(_no_nan(result), indent=2) + "\n")
    return path


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value
