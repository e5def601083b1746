"""`python -m bench`: the side-by-side serving benchmark (`make bench`).

Exit codes: 0 the run completed (whatever the targets say: see the report); 2 a contender
or a load run failed (the report lists it under `failures`), or the options were wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.config import ARCHITECTURES, CONTENDER_NAMES, DEFAULT_HOME, BenchConfig

SCORING = "score"  # `--only score`: the batch-scoring section (bench/scoring.py)


def parse_service_settings(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    """`SETTING=VALUE` strings -> pairs; a setting the service does not have is an error
    (the service would ignore its variable, and the run would measure the default)."""
    from service.settings import ServiceSettings

    settings: list[tuple[str, str]] = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().lower()
        if not sep or not name:
            raise ValueError(f"--service takes SETTING=VALUE, got {pair!r}")
        if name not in ServiceSettings.model_fields:
            raise ValueError(f"--service: the service has no setting {name!r}")
        settings.append((name, value))
    return tuple(settings)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs (seconds each): a smoke run, not numbers to quote"
    )
    parser.add_argument("--out", type=Path, help="report folder (default: <home>/report)")
    parser.add_argument(
        "--home", type=Path, default=DEFAULT_HOME, help=f"the benchmark's own CANARY_HOME (default {DEFAULT_HOME})"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes per server (default 1)")
    parser.add_argument("--models", nargs="+", choices=ARCHITECTURES, help="models to bench (default: both)")
    parser.add_argument(
        "--only", nargs="+", choices=(*CONTENDER_NAMES, SCORING), help=f"contenders to run, and {SCORING!r} for the "
        "batch-scoring section (default: all); `--only score` runs that section alone",
    )  # fmt: skip
    parser.add_argument("--score-rows", type=int, help="rows scored by the batch-scoring section (default 1,000,000)")
    parser.add_argument("--duration", type=float, help="seconds per measured window (default 10, quick 2)")
    parser.add_argument("--connections", type=int, help="connections for saturated runs (default 32, quick 8)")
    parser.add_argument("--rows", type=int, default=1, help="digits per request (default 1)")
    parser.add_argument("--no-cache", action="store_true", help="skip the cache-hit comparison")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait before each window for other work on the machine to pause (default 60, at most 600 in all; quick 0)",
    )
    parser.add_argument("--fresh", action="store_true", help="retrain and rebuild even if the bench home has Bentos")
    parser.add_argument(
        "--service", action="append", default=[], metavar="SETTING=VALUE",
        help="a service setting for every project server of the run, e.g. grpc_transport=grpcio (repeatable; "
        "stamped in the report). CANARY_SERVICE_* variables in the environment are ignored",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 1 or args.rows < 1:
        parser.error("--workers and --rows must be at least 1")
    try:
        service_settings = parse_service_settings(args.service)
    except ValueError as exc:
        parser.error(str(exc))
    only = args.only or ()
    overrides = {
        "home": args.home,
        "out": args.out,
        "workers": args.workers,
        "rows": args.rows,
        "cache": not args.no_cache,
        "fresh": args.fresh,
        "service_settings": service_settings,
        **({"models": tuple(args.models)} if args.models else {}),
        **({"contenders": tuple(c for c in only if c != SCORING), "scoring": SCORING in only} if only else {}),
        **({"scoring_rows": args.score_rows} if args.score_rows else {}),
        **({"duration_s": args.duration} if args.duration else {}),
        **({"connections": args.connections} if args.connections else {}),
        **({"quiet_wait_s": args.quiet_wait} if args.quiet_wait is not None else {}),
    }
    return BenchConfig.quick_run(**overrides) if args.quick else BenchConfig(**overrides)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if not config.contenders and config.scoring:  # `--only score`: that section alone
        from bench.scoring import run_scoring_only

        return run_scoring_only(config, lambda line: print(line, flush=True))
    from bench.runner import run_benchmark

    code, _ = run_benchmark(config, lambda line: print(line, flush=True))
    return code


if __name__ == "__main__":
    sys.exit(main())
