"""Batch scoring in the benchmark (issue 18): `canary score` on the local engine over one
Parquet file of a million digits, against the in-process ONNX Runtime limit of the same graph.

The command runs as a child process, as a user runs it; its rows/s is the one it reports
(reading, checking, inference, writing), its peak memory the kernel's max RSS for it
(`os.wait4` in `bench.child_usage`, a small launcher, so that the benchmark's own memory is not
counted), and the share of the machine other processes used meanwhile is reported as noise.
Part of `python -m bench`, or alone: `python -m bench --only score`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.config import BenchConfig

SCORE_MODEL = "digits-cnn"
TARGET_RATIO = 0.7  # of the in-process limit
TARGET_PEAK_MIB = 1024.0
_SUMMARY = re.compile(r"scored ([\d,]+) rows .* in ([\d.]+) s \(([\d,]+) rows/s\)")


@dataclass(frozen=True)
class ScoringResult:
    model: str
    version: int
    rows: int
    input_mib: float
    seconds: float  # scoring as `canary score` reports it: read, check, infer, write
    wall_s: float  # the whole command: start-up, registry and sha256 checks, MLflow run
    rows_per_s: float
    peak_rss_mib: float
    limit_rows_per_s: float  # in-process ONNX Runtime at its best batch size and threads
    other_cpu_share: float  # of the machine, used by processes outside the command meanwhile

    @property
    def vs_limit(self) -> float:
        return self.rows_per_s / self.limit_rows_per_s if self.limit_rows_per_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "vs_limit": self.vs_limit}

    def markdown(self) -> str:
        ok_rate, ok_memory = self.vs_limit >= TARGET_RATIO, self.peak_rss_mib < TARGET_PEAK_MIB
        return "\n".join(
            [
                "### Batch scoring (`canary score`, local engine)",
                "",
                "| model | rows | input | scoring s | rows/s | vs limit | peak RSS | whole command | other CPU |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {self.model} v{self.version} | {self.rows:,} | {self.input_mib:.0f} MiB | {self.seconds:.1f} | "
                f"{self.rows_per_s:,.0f} | {self.vs_limit:.2f}x of {self.limit_rows_per_s:,.0f}/s | "
                f"{self.peak_rss_mib:.0f} MiB | {self.wall_s:.1f} s | {self.other_cpu_share:.0%} |",
                "",
                f"- throughput vs the in-process limit: {self.vs_limit:.2f} (target >= {TARGET_RATIO:g}): "
                f"{'pass' if ok_rate else 'FAIL'}",
                f"- peak memory {self.peak_rss_mib:.0f} MiB (target < {TARGET_PEAK_MIB:.0f}): "
                f"{'pass' if ok_memory else 'FAIL'}",
                "",
            ]
        )


def write_digits_file(path: Path, rows: int, piece: int = 65_536) -> None:
    """The 1,797 digits repeated to `rows` rows, 64 float32 columns input_0..input_63, written
    piece by piece (pyarrow's default row groups) and renamed into place when complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits().data.astype(np.float32)
    schema = pa.schema([pa.field(f"input_{i}", pa.float32()) for i in range(digits.shape[1])])
    partial = path.with_suffix(".partial")
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, rows, piece):
            index = np.arange(start, min(rows, start + piece)) % len(digits)
            block = digits[index]
            writer.write_batch(pa.RecordBatch.from_arrays([pa.array(block[:, i]) for i in range(64)], schema=schema))
    partial.replace(path)


def measure_scoring(
    home: Path, version: int, limit_rows_per_s: float, rows: int, workdir: Path, say: Callable[[str], None]
) -> ScoringResult:
    """Run `canary score <version>` on a file of `rows` digits in the state folder `home`."""
    from bench.cpu import machine_busy_seconds
    from deploy.process import venv_bin

    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / f"digits-{rows}.parquet"
    if not source.exists():
        say(f"  writing {rows:,} rows to {source}")
        write_digits_file(source, rows)
    output, log, usage_file = workdir / "scored.parquet", workdir / "score.log", workdir / "score-usage.json"
    usage_file.unlink(missing_ok=True)
    argv = [venv_bin("canary"), "score", str(version), "--input", str(source), "--output", str(output)]
    env = {**os.environ, "CANARY_HOME": str(home)}
    busy, started = machine_busy_seconds(), time.monotonic()
    with open(log, "wb") as stderr:
        # through a small launcher: this process's own memory would count in the child's max RSS
        launcher = [sys.executable, "-m", "bench.child_usage", str(usage_file), *argv]
        run = subprocess.run(launcher, stdout=subprocess.PIPE, stderr=stderr, env=env, check=False)
    wall = time.monotonic() - started
    stdout = run.stdout.decode(errors="replace")
    if run.returncode != 0 or not usage_file.exists() or not (found := _SUMMARY.search(stdout)):
        raise RuntimeError(f"canary score failed: {log.read_text(errors='replace').strip()[-400:]}")
    usage = json.loads(usage_file.read_text())  # the command's exact CPU time and peak RSS
    other = (machine_busy_seconds() - busy) - (usage["user_s"] + usage["system_s"])
    scored = int(found.group(1).replace(",", ""))
    return ScoringResult(
        model=SCORE_MODEL,
        version=version,
        rows=scored,
        input_mib=source.stat().st_size / 2**20,
        seconds=float(found.group(2)),
        wall_s=wall,
        rows_per_s=float(found.group(3).replace(",", "")),
        peak_rss_mib=usage["max_rss_kib"] / 1024,
        limit_rows_per_s=limit_rows_per_s,
        other_cpu_share=max(0.0, other / wall / (os.cpu_count() or 1)),
    )


def run_scoring_only(config: BenchConfig, say: Callable[[str], None]) -> int:
    """`python -m bench --only score`: prepare digits-cnn, measure its limit, score, report."""
    import json

    from bench.prepare import BenchHome, prepare_model

    home = BenchHome(home=config.home)
    home.activate()  # before bentoml / mlflow are imported below
    os.environ["CANARY_HOME"] = str(home.home)
    home.create()
    from bench.cpu import wait_for_quiet
    from bench.limit import compute_limit
    from bench.machine import cpu_model, timestamp
    from bench.payloads import sample_rows

    say(f"batch scoring only: {config.scoring_rows:,} rows, {SCORE_MODEL}, bench home {home.home}")
    model = prepare_model(home, SCORE_MODEL, config.epochs.get(SCORE_MODEL, 1), config.fresh, lambda m: say(f"  {m}"))
    waited, share = wait_for_quiet(config.quiet_wait_s)
    say(f"  in-process ONNX Runtime limit (waited {waited:.0f} s for quiet; others use {share:.0%}):")
    limit = compute_limit(
        model.onnx_path, sample_rows(config.rows), config.limit_batches, config.limit_threads, config.limit_seconds, say
    )
    say(f"  canary score on {config.scoring_rows:,} rows (local engine)")
    result = measure_scoring(
        home.home, model.version, limit.samples_per_s, config.scoring_rows, home.home / "work" / "scoring", say
    )
    out = config.report_dir
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"timestamp": timestamp(), "cpu_model": cpu_model(), "cores": os.cpu_count(), "quick": config.quick}
    (out / "scoring.json").write_text(json.dumps({**stamp, **result.as_dict()}, indent=2))
    markdown = f"{stamp['timestamp']} · {stamp['cpu_model']}, {stamp['cores']} cores\n\n{result.markdown()}"
    (out / "scoring.md").write_text(markdown)
    say("")
    say(markdown)
    say(f"    json: {out / 'scoring.json'}")
    return 0
