"""The benchmark plan, step by step: prepare, limit, saturate, fixed load, cache, report.

Servers run one after another, never two at once. A contender that fails to start or a
load run that fails is recorded in the report's `failures` and the run goes on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.config import BenchConfig
from bench.prepare import BenchHome, PreparedModel

Say = Callable[[str], None]


def _brief(exc: Exception) -> str:
    """First and last line of an error (a server's log tail ends with the real cause)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class BenchRun:
    def __init__(self, config: BenchConfig, home: BenchHome, say: Say) -> None:
        from bench.results import Measurement

        self.config, self.home, self.say = config, home, say
        self.measurements: list[Measurement] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.refused: list[dict[str, str]] = []  # rows that could not be served, each with the reason
        self.redis_counts: dict[str, tuple[int, int]] = {}
        self.workdir = home.home / "work"
        self.quiet_waited = 0.0  # seconds spent waiting for other processes to pause

    def context(self, rows):
        from bench.contenders import ServeContext

        extra_env = {f"CANARY_SERVICE_{name.upper()}": value for name, value in self.config.service_settings}
        return ServeContext(self.config.workers, self.home.logs, rows, self.home.bentoml_home, extra_env)

    def run_contender(
        self, contender, model: PreparedModel, rows, mode: str, connections: int, rate: float = 0.0
    ) -> None:
        """Start one contender, load each of its endpoints in turn, stop it."""
        from bench.contenders import SkipContender
        from bench.cpu import tree_size
        from bench.measure import describe, load_endpoint, to_measurement

        c = self.config
        started = time.monotonic()
        try:
            with contender.serve(model, self.context(rows)) as served:
                self.say(
                    f"  {contender.label}: up in {time.monotonic() - started:.0f}s ({tree_size(served.pid)} processes)"
                )
                for note in (f"{contender.name}: {n}" for n in served.notes):
                    if note not in self.notes:
                        self.notes.append(note)
                for endpoint in served.endpoints:
                    self.wait_quiet()
                    workdir = self.workdir / model.architecture / contender.name / endpoint.protocol / mode
                    try:
                        result, server_cpu, loadgen = load_endpoint(
                            endpoint, (served.pid, *served.extra_pids), workdir, duration_s=c.duration_s, warmup_s=c.warmup_s,
                            connections=connections, grpc_processes=c.grpc_processes, rate=rate,
                        )  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - one failed run must not end the benchmark
                        self.failures.append(
                            f"{model.architecture} {contender.name} {endpoint.protocol} {mode}: {_brief(exc)}"
                        )
                        self.say(f"    {endpoint.protocol:<11} FAILED: {_brief(exc)}")
                        continue
                    m = to_measurement(
                        model.architecture,
                        contender,
                        endpoint,
                        mode,
                        connections,
                        result,
                        server_cpu,
                        loadgen,
                        rate or None,
                    )
                    self.measurements.append(m)
                    self.say(f"    {endpoint.protocol:<11} {describe(m)}")
                if served.closing_notes is not None:  # the server's own account of the run, before it stops
                    try:
                        closing = served.closing_notes()
                    except Exception as exc:  # noqa: BLE001 - the measurements stand; the account is missing
                        closing = (f"its own counts could not be read: {_brief(exc)}",)
                    for note in closing:
                        self.notes.append(f"{contender.name} {model.architecture} {mode}: {note}")
                        self.say(f"    {note}")
        except SkipContender as skip:
            self.say(f"  {contender.label}: skipped ({skip})")
        except Exception as exc:  # noqa: BLE001 - a contender that cannot start is a finding, not a crash
            self.failures.append(f"{model.architecture} {contender.name} ({mode}): {_brief(exc)}")
            self.say(f"  {contender.label}: FAILED to serve: {_brief(exc)}")

    def wait_quiet(self) -> None:
        from bench.cpu import wait_for_quiet

        budget = min(self.config.quiet_wait_s, self.config.quiet_budget_s - self.quiet_waited)
        if budget <= 0:
            return
        waited, share = wait_for_quiet(budget)
        self.quiet_waited += waited
        if waited > 1.5:
            self.say(
                f"    (waited {waited:.0f}s for other processes to calm down; they now use {share:.0%} of the machine)"
            )

    def run_cache(self, model: PreparedModel, rows) -> None:
        from bench.contenders import ProjectBento
        from bench.processes import redis_hits, redis_server
        from bench.results import CACHE_HIT

        try:
            with redis_server() as url:
                before = redis_hits(url)
                self.run_contender(
                    _OnlyRestJson(ProjectBento(cache_url=url)), model, rows, CACHE_HIT, self.config.connections
                )
                after = redis_hits(url)
                self.redis_counts[model.architecture] = (after[0] - before[0], after[1] - before[1])
        except Exception as exc:  # noqa: BLE001
            self.failures.append(f"{model.architecture} cache: {_brief(exc)}")
            self.say(f"  cache run FAILED: {_brief(exc)}")


class _OnlyRestJson:
    """A contender restricted to its V2 REST JSON endpoint (the cache comparison)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.label, self.kind, self.baseline = (
            inner.name,
            inner.label + " + cache",
            inner.kind,
            inner.baseline,
        )

    def serve(self, model, ctx):
        from contextlib import contextmanager
        from dataclasses import replace

        @contextmanager
        def only():
            with self.inner.serve(model, ctx) as served:
                yield replace(served, endpoints=tuple(e for e in served.endpoints if e.protocol == "rest-json"))

        return only()


def run_benchmark(config: BenchConfig, say: Say) -> tuple[int, dict[str, Path] | None]:
    """The whole benchmark; returns (exit code, written report paths)."""
    t0 = time.monotonic()

    def step(message: str) -> None:
        say(f"[{time.monotonic() - t0:6.0f}s] {message}")

    home = BenchHome(home=config.home)
    home.activate()  # before bentoml / mlflow are imported anywhere below
    os.environ["CANARY_HOME"] = str(home.home)
    stripped = sorted(k for k in os.environ if k.startswith("CANARY_SERVICE_"))
    for key in stripped:  # every server starts from the service's defaults
        del os.environ[key]
    home.create()

    from bench import machine as stamp
    from bench.config import CONTENDER_NAMES
    from bench.contenders import build_contenders
    from bench.limit import compute_limit
    from bench.payloads import sample_rows
    from bench.prepare import prepare_model
    from bench.report import build_report, render_markdown, write_report
    from bench.results import FIXED, INT8_CONTENDERS, SATURATED, build_table, cache_results, fixed_rate, judge_targets

    machine_before = stamp.machine()
    step(f"bench home {home.home}; {config.workers} worker(s) per server; {'QUICK' if config.quick else 'full'} run")
    if stripped:
        say(
            f"  ignoring {', '.join(stripped)} from the environment: servers run with default settings"
            + (" and --service" if config.service_settings else "; set one with --service SETTING=VALUE")
        )
    if config.service_settings:
        say("  the project's servers run with " + ", ".join(f"{k}={v}" for k, v in config.service_settings))
    run = BenchRun(config, home, say)
    rows = sample_rows(config.rows)

    step("1/5 preparing models (train -> register -> export -> build)")
    prepared: dict[str, PreparedModel] = {}
    for arch in config.models:
        try:
            int8 = arch in config.int8_models and bool(set(INT8_CONTENDERS) & set(config.contenders))
            prepared[arch] = prepare_model(
                home, arch, config.epochs.get(arch, 1), config.fresh, lambda m: say(f"  {m}"), int8=int8,
                learning_rate=config.learning_rates.get(arch), lr_schedule=config.lr_schedules.get(arch, "constant"),
            )  # fmt: skip
            for variant in (prepared[arch], prepared[arch].int8):
                if variant is not None:
                    run.notes.append(
                        f"{arch} {variant.precision} (registry version {variant.version}): {variant.accuracy}"
                    )
            if prepared[arch].int8_refused:  # a row of its own in the table, with the reason
                run.refused.append(
                    {"model": arch, "label": "bento-canary, int8 export", "reason": prepared[arch].int8_refused}
                )
        except Exception as exc:  # noqa: BLE001
            run.failures.append(f"{arch} preparation: {_brief(exc)}")
            say(f"  {arch}: preparation FAILED: {_brief(exc)}")

    step("2/5 in-process ONNX Runtime limit (best batch size x threads)")
    limits = {}
    for arch, model in prepared.items():
        say(f"  {arch}:")
        run.wait_quiet()
        limit = compute_limit(
            model.onnx_path, rows, config.limit_batches, config.limit_threads, config.limit_seconds, say
        )
        limits[arch] = {**asdict(limit.best), "points": [asdict(p) for p in limit.points]}
        if model.int8 is not None:  # the int8 row is measured against the int8 graph's own limit
            say(f"  {arch} int8:")
            limit = compute_limit(
                model.int8.onnx_path, rows, config.limit_batches, config.limit_threads, config.limit_seconds, say
            )
            limits[f"{arch}:int8"] = {**asdict(limit.best), "points": [asdict(p) for p in limit.points]}

    contenders = build_contenders(config.contenders)
    step(f"3/5 saturated throughput, {config.connections} connections")
    for model in prepared.values():
        for contender in contenders:
            run.run_contender(contender, model, rows, SATURATED, config.connections)

    step(f"4/5 latency at a fixed offered load ({config.fixed_fraction:g} x the slowest contender's saturation)")
    for arch, model in prepared.items():
        rate = fixed_rate([m for m in run.measurements if m.model == arch], config.fixed_fraction)
        if rate <= 0:
            continue
        say(f"  {arch}: {rate:,.0f} requests/s offered")
        for contender in contenders:
            run.run_contender(contender, model, rows, FIXED, config.fixed_connections, rate)

    in_turns = None  # issue 15: the live-traffic features' cost, off and on in turns (bench/live_traffic.py)
    if "bento-predlog" in config.contenders and "digits-cnn" in prepared:
        from bench.live_traffic import measure_in_turns

        step(
            f"+ prediction log, drift and shadow diff: off and on in turns ({config.turns} rounds, digits-cnn REST JSON)"
        )
        run.wait_quiet()
        try:
            in_turns = measure_in_turns(
                prepared["digits-cnn"], run.context(rows), config.turns, config.duration_s, config.connections,
                run.workdir / "in-turns", say,
            )  # fmt: skip
            say(f"  log + drift / off = {in_turns.log_drift_ratio:.3f}; all three / off = {in_turns.ratio:.3f}")
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding, not a crash
            run.failures.append(f"live-traffic cost in turns: {_brief(exc)}")
            say(f"  FAILED: {_brief(exc)}")

    step("5/5 response cache: hits vs misses (this project, digits-heavy)")
    cache_mix = None  # issue 16: hits next to misses at saturation (bench/cache_mix.py)
    if config.cache and "digits-heavy" in prepared and "bento" in config.contenders:
        run.run_cache(prepared["digits-heavy"], rows)
        from bench.cache_mix import measure_cache_mix

        say("  hits next to misses, at once (half the connections each)")
        run.wait_quiet()
        try:
            cache_mix = measure_cache_mix(
                prepared["digits-heavy"], run.context(rows), config.duration_s, config.connections,
                run.workdir / "cache-mix", say,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding, not a crash
            run.failures.append(f"cache hits next to misses: {_brief(exc)}")
            say(f"  FAILED: {_brief(exc)}")
    else:
        say("  skipped")

    scoring = None  # issue 18: `canary score` on a big file vs the in-process limit (bench/scoring.py)
    if config.scoring and "digits-cnn" in prepared and "digits-cnn" in limits:
        from bench.scoring import measure_scoring

        step(f"+ batch scoring: canary score on {config.scoring_rows:,} rows (digits-cnn, local engine)")
        run.wait_quiet()
        try:
            scoring = measure_scoring(
                home.home, prepared["digits-cnn"].version, limits["digits-cnn"]["samples_per_s"],
                config.scoring_rows, run.workdir / "scoring", say,
            )  # fmt: skip
            say(f"  {scoring.rows_per_s:,.0f} rows/s, {scoring.vs_limit:.2f}x limit, {scoring.peak_rss_mib:.0f} MiB")
        except Exception as exc:  # noqa: BLE001 - a failed section is a finding, not a crash
            run.failures.append(f"batch scoring: {_brief(exc)}")
            say(f"  batch scoring FAILED: {_brief(exc)}")

    limit_rates = {arch: v["samples_per_s"] for arch, v in limits.items()}
    table = build_table(run.measurements, limit_rates)
    cache = cache_results(run.measurements, run.redis_counts)
    targets = judge_targets(table, cache, in_turns.ratio if in_turns else None, cache_mix)
    machine_info = {**stamp.machine(), "load_average_at_start": machine_before["load_average"]}
    notes = [*run.notes, f"total run time {time.monotonic() - t0:.0f} s"]
    skipped = [name for name in CONTENDER_NAMES if name not in config.contenders]
    if skipped:
        notes.append(f"partial run without {', '.join(skipped)}: ratios are against the alternatives that ran")
    noisy = [m for m in run.measurements if m.other_cpu_share > 0.10]
    if noisy:
        worst = max(noisy, key=lambda m: m.other_cpu_share)
        notes.append(
            f"other processes used > 10% of the machine during {len(noisy)} of {len(run.measurements)} windows "
            f"(worst {worst.other_cpu_share:.0%}: {worst.model} {worst.contender} {worst.protocol} {worst.mode}); "
            "those numbers are low by about that share"
        )
    report = build_report(
        config.as_dict(), machine_info, stamp.versions(), stamp.timestamp(), limits,
        run.measurements, table, cache, targets, notes, run.failures,
    )  # fmt: skip
    if scoring is not None:
        report["batch_scoring"] = scoring.as_dict()
    if in_turns is not None:
        report["live_traffic_cost"] = in_turns.as_dict()
    if cache_mix is not None:
        report["cache_mix"] = cache_mix.as_dict()
    report["refused"] = run.refused
    markdown = render_markdown(report, table, cache, targets)
    if in_turns is not None:
        markdown += "\n" + in_turns.markdown()
    if cache_mix is not None:
        markdown += "\n" + cache_mix.markdown()
    if scoring is not None:
        markdown += "\n" + scoring.markdown()
    paths = write_report(config.report_dir, report, markdown, table)
    say("")
    say(markdown)
    for kind, path in paths.items():
        say(f"{kind:>8}: {path}")
    if run.failures:
        say(f"{len(run.failures)} failure(s):")
        for failure in run.failures:
            say(f"  - {failure[:400]}")
    step("done")
    return (2 if run.failures else 0), paths
