"""`BenchConfig`: every knob of one benchmark run, fixed before the run starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.home import REPO_ROOT

DEFAULT_HOME = REPO_ROOT / ".canary" / "bench"
ARCHITECTURES = ("digits-cnn", "digits-heavy")
CONTENDER_NAMES = (
    "bento", "bento-int8", "bento-nginx", "bento-predlog", "bento-2w", "bento-int8-2w", "bentoml-plain", "fastapi", "mlflow",
    "mlserver", "kserve", "litserve", "grpc-ceiling",
)  # fmt: skip


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and for how long. `quick()` shrinks everything for a smoke run."""

    home: Path = DEFAULT_HOME  # the benchmark's own CANARY_HOME
    out: Path | None = None  # report folder; default <home>/report
    quick: bool = False
    workers: int = 1  # worker processes given to every server
    models: tuple[str, ...] = ARCHITECTURES
    contenders: tuple[str, ...] = CONTENDER_NAMES
    # digits-cnn: the CLI's default 15 epochs, 96.7% test accuracy (3 epochs left it at 86.9%: a
    # benchmark of a model nobody would ship); about 5 s of training
    epochs: dict[str, int] = field(default_factory=lambda: {"digits-cnn": 15, "digits-heavy": 3})
    # digits-heavy: 1e-3 decaying to 0 (cosine) over its 3 epochs: 98% test accuracy where a
    # constant rate left its batch-normalised layers jumping between 95% and 96% epoch to epoch
    learning_rates: dict[str, float] = field(default_factory=lambda: {"digits-heavy": 1e-3})
    lr_schedules: dict[str, str] = field(default_factory=lambda: {"digits-heavy": "cosine"})
    fresh: bool = False  # retrain even when the bench home already has a built Bento
    # (setting, value) pairs every project server of the run gets (`--service`); CANARY_SERVICE_*
    # in the environment are ignored, so a setting's A/B is two runs with different pairs
    service_settings: tuple[tuple[str, str], ...] = ()
    int8_models: tuple[str, ...] = ("digits-heavy",)  # also served as an int8 export (`bento-int8`)
    rows: int = 1  # rows (digits) per request
    warmup_s: float = 2.0
    duration_s: float = 10.0
    connections: int = 32  # saturated runs: open connections (gRPC: calls in flight)
    fixed_connections: int = 16  # fixed-load runs: most requests in flight
    fixed_fraction: float = 0.5  # fixed load = this share of the slowest contender's saturation
    grpc_processes: int = 2  # load-generator processes for gRPC
    cache: bool = True  # also measure cache hits on digits-heavy
    limit_batches: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
    limit_threads: tuple[int, ...] = (1, 2)
    limit_seconds: float = 1.5  # per (batch, threads) point of the in-process sweep
    quiet_wait_s: float = 60.0  # before each window, wait up to this long for other work to pause
    quiet_budget_s: float = 600.0  # ... and at most this long over the whole run
    scoring: bool = True  # the batch-scoring section (`canary score` on a big file, bench/scoring.py)
    scoring_rows: int = 1_000_000  # rows in its input file
    turns: int = 4  # the live-traffic features' cost: rounds of (off, on) windows taken in turns

    @classmethod
    def quick_run(cls, **overrides: Any) -> BenchConfig:
        """Tiny runs: enough to prove every contender starts and answers."""
        settings: dict[str, Any] = dict(
            quick=True,
            epochs={"digits-cnn": 1, "digits-heavy": 1},
            warmup_s=0.5,
            duration_s=2.0,
            connections=8,
            fixed_connections=4,
            grpc_processes=1,
            limit_batches=(1, 64),
            limit_threads=(1, 2),
            limit_seconds=0.3,
            quiet_wait_s=0.0,
            scoring_rows=100_000,
            turns=1,
        )
        settings.update(overrides)
        return cls(**settings)

    @property
    def report_dir(self) -> Path:
        return self.out or self.home / "report"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["home"], data["out"] = str(self.home), str(self.report_dir)
        return data
