"""`canary`: the one command users run. Each command parses options and calls a plain function.

Domain errors (`CanaryError`) and usage errors print one line and exit 1.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

from models.errors import CanaryError
from models.home import CanaryHome

app = typer.Typer(
    name="canary",
    help="Train, export, build, serve and release digit-classifier Bentos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Version = Annotated[int | None, typer.Option("--version", "-v", help="Registry version number.")]
Alias = Annotated[str | None, typer.Option("--alias", "-a", help="Registry alias, e.g. champion.")]


_OPTIONS = {"target": "local"}


@app.callback()
def _options(
    target: Annotated[
        str, typer.Option("--target", help="Where releases run: local (processes), compose or k8s.")
    ] = "local",
) -> None:
    """bento-canary: train, export, build, serve and release model Bentos."""
    if target not in ("local", "compose", "k8s"):
        raise CanaryError(f"--target must be local, compose or k8s, got {target!r}")
    _OPTIONS["target"] = target


def _home() -> CanaryHome:
    home = CanaryHome()
    home.activate()
    return home


def say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    model: Annotated[
        str, typer.Option(help="digits-cnn, digits-heavy or digits-linear (scikit-learn).")
    ] = "digits-cnn",
    epochs: Annotated[int, typer.Option(help="Training epochs (at least 1).")] = 15,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same model.")] = 0,
) -> None:
    """Train a model, log it to MLflow and register a new version of `digits`."""
    from models.pipeline import train_and_register
    from models.train import TrainConfig

    config = TrainConfig(model=model, epochs=epochs, seed=seed)
    config.validate()
    result = train_and_register(_home(), config, say)
    typer.echo(f"{result.ref.label} test_accuracy={result.test_accuracy:.4f} aliases={','.join(result.ref.aliases)}")


@app.command()
def export(
    version: Version = None,
    alias: Alias = None,
    quantize: Annotated[
        str, typer.Option(help="fp32, or int8 (static quantisation; refused if it loses over 0.5 points).")
    ] = "fp32",
) -> None:
    """Export a registry version to ONNX, check parity, import it into the BentoML store."""
    from models.pipeline import export_version

    result = export_version(_home(), version, alias, say=say, quantize=quantize)
    typer.echo(f"{result.stored.tag} sha256={result.sha256}")


@app.command()
def build(version: Version = None, alias: Alias = None) -> None:
    """Build the serving Bento for a registry version and export it to bentos/."""
    from models.bento import build_bento

    result = build_bento(_home(), version, alias, say=say)
    typer.echo(f"{result.tag} {result.archive} {result.archive_bytes} bytes")


@app.command()
def serve(
    bento: Annotated[str, typer.Argument(help="Bento tag, e.g. digits-service:v1.")],
    port: Annotated[int, typer.Option(help="BentoML HTTP port (native API, /metrics, V2 too).")] = 3000,
    rest_port: Annotated[
        int | None,
        typer.Option(help="V2 REST listener, the fast path (0 = off). [default: CANARY_SERVICE_REST_PORT or 8000]"),
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="V2 gRPC port (0 = off). [default: CANARY_SERVICE_GRPC_PORT or 50051]")
    ] = None,
) -> None:
    """Serve a built Bento in the foreground (Ctrl-C stops it)."""
    import os

    home = _home()
    home.require()
    from deploy.process import venv_bin

    # A flag wins over the environment; the service's settings read these (default 8000 / 50051).
    for name, value in (("CANARY_SERVICE_REST_PORT", rest_port), ("CANARY_SERVICE_GRPC_PORT", grpc_port)):
        if value is not None:
            os.environ[name] = str(value)
    argv = [venv_bin("bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)]
    os.execv(argv[0], argv)  # noqa: S606  # nosec B606 - become the server; fixed argv


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
) -> None:
    """The whole flow once: train -> register -> export -> build -> serve -> predict."""
    from deploy.demo import run_demo

    run_demo(_home(), epochs, say)


_INPUT_HELP = (
    "A CSV or Parquet file, or a folder of them: columns input_0..input_63, or one list column input of 64 numbers."
)
_OUTPUT_HELP = "FILE.parquet or FILE.csv; replaced only once every row is scored."


@app.command()
def score(
    release: Annotated[str, typer.Argument(help="Model version (3) or alias (@champion).")],
    input_path: Annotated[str | None, typer.Option("--input", "-i", help=_INPUT_HELP)] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help=_OUTPUT_HELP)] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="local (default) or spark.")] = None,
    logits: Annotated[bool, typer.Option("--logits", help="Also write the graph's raw scores per row.")] = False,
    chunk_rows: Annotated[int | None, typer.Option("--chunk-rows", help="Rows per chunk (default 65536).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Local engine threads (default: all cores).")] = None,
    spark_master: Annotated[str | None, typer.Option("--spark-master", help="Spark master (default local[*]).")] = None,
    replay: Annotated[
        bool,
        typer.Option(
            "--replay",
            help="Score the prediction log's real inputs instead of files, judged against "
            "the live answers with the gate's thresholds (exit 1 if the candidate fails).",
        ),
    ] = False,  # fmt: skip
    since: Annotated[str, typer.Option("--since", help="--replay: start, 1h, 30m, 2d (ago) or an ISO time.")] = "1h",
    until: Annotated[str, typer.Option("--until", help="--replay: end (exclusive), now or 10m (ago).")] = "now",
    source: Annotated[str | None, typer.Option("--from", help=_FROM_HELP)] = None,
    thresholds: Annotated[
        str | None, typer.Option("--thresholds", help="--replay: the gate's limits (default loadtest/thresholds.yaml).")
    ] = None,
) -> None:
    """Score files with the exact graph a version serves (sha256 checked); output carries the
    version and sha256, and a run is logged to MLflow (experiment digits-scoring). With
    --replay, score the inputs the prediction log kept and judge the version against what
    was answered live."""
    from pathlib import Path

    from deploy.progress_bar import RowProgress

    if replay:
        if input_path or output:
            raise CanaryError("--replay reads the prediction log: leave out --input and --output")
        _replay(release, since, until, source, _thresholds(thresholds))
        return
    if not input_path or not output:
        raise CanaryError("score needs --input and --output (or --replay to score the prediction log's inputs)")
    from models.score import ScoreSettings, score_files

    settings = ScoreSettings.with_options(
        engine=engine, logits=logits or None, chunk_rows=chunk_rows, workers=workers, spark_master=spark_master
    )
    with RowProgress(say) as progress:
        result = score_files(_home(), release, Path(input_path), Path(output), settings, say, progress)
    typer.echo(result.summary())


def _replay(release: str, since: str, until: str, source: str | None, limits) -> None:
    from deploy.predictions import open_log_store, parse_window, reading_log
    from deploy.progress_bar import RowProgress
    from deploy.replay import replay_candidate

    start, end = parse_window(since, until)
    home = _home()
    store, where = open_log_store(home, source)
    try:
        with reading_log(where), RowProgress(say, "replaying") as progress:
            report = replay_candidate(home, release, store, start, end, limits, say, progress)
    finally:
        store.close()
    _print_verdict(report)


def _print_verdict(report) -> None:
    """A replay's or shadow gate's report on stdout; exit 1 unless it passed."""
    for line in report.lines():
        typer.echo(line)
    if not report.verdict.passed:
        raise typer.Exit(1)


def _thresholds(path: str | None):
    """The gate's thresholds file, checked (default loadtest/thresholds.yaml); one line if bad."""
    import yaml

    from loadtest.gate import DEFAULT_THRESHOLDS, GateThresholds

    try:
        return GateThresholds.from_yaml(path or DEFAULT_THRESHOLDS)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        raise CanaryError(f"--thresholds {path}: {' '.join(str(exc).split())}") from None


DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan and the routing diff; change nothing.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
Bake = Annotated[
    str | None,
    typer.Option("--bake", help="Watch the new stable this long after promote, e.g. 2m (0 = no bake; "
                 "default CANARY_STACK_BAKE_S)."),
]  # fmt: skip
Duration = Annotated[str, typer.Option("--duration", help="Load per gate, e.g. 30s (at most 60s is enough).")]
Users = Annotated[int, typer.Option("--users", help="Locust users (each loads both slots).")]
SpawnRate = Annotated[float, typer.Option("--spawn-rate", help="Users started per second.")]
Thresholds = Annotated[
    str | None, typer.Option("--thresholds", help="The gate's limits (YAML); default loadtest/thresholds.yaml.")
]


def _target():
    """The `ReleaseTarget` of `--target`, resolved once per command (deploy/targets/)."""
    from deploy.targets import TARGETS

    home = CanaryHome()
    if _OPTIONS["target"] != "k8s":  # a cluster's commands touch no local state folder
        home.activate()
    return TARGETS[_OPTIONS["target"]](home)


def _print(applied) -> None:
    """A routing command's lines on stdout, its exit code for the shell."""
    for line in applied.lines:
        typer.echo(line)
    if applied.exit_code:
        raise typer.Exit(applied.exit_code)


@app.command()
def up() -> None:
    """Start the local stack: Redis, the Bento slots, nginx (REST + gRPC). Idempotent."""
    for line in _target().up(say):
        typer.echo(line)


@app.command()
def down() -> None:
    """Stop every process `canary up` started, and nothing else."""
    stopped = _target().down()
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def deploy(
    release: Annotated[str, typer.Argument(help="Model version (3), alias (@challenger) or Bento tag.")],
    dry_run: DryRun = False,
) -> None:
    """Start a candidate in the idle slot; it gets 0% of traffic until `weight`/`switch`."""
    _print(_target().deploy(release, dry_run))


@app.command()
def weight(
    percent: Annotated[int, typer.Argument(help="Candidate share of REST and gRPC traffic, 0-100.")],
    dry_run: DryRun = False,
) -> None:
    """Set the candidate's share of traffic (applied within a second, no nginx reload); a slot
    whose share grows is checked first (alive, ready, smoke inference)."""
    _print(_target().weight(percent, dry_run))


@app.command()
def switch(dry_run: DryRun = False) -> None:
    """Blue-green cut-over: the candidate takes 100%; the old stable stays warm for a switch back."""
    _print(_target().switch(dry_run))


@app.command()
def promote(dry_run: DryRun = False, bake: Bake = None) -> None:
    """The candidate becomes stable at 100% after a check (alive, ready, smoke inference); the
    old stable stays warm while the new one bakes on live traffic, and a breach of the gate's
    SLOs switches back by itself. Then MLflow alias `champion` moves to its version.

    Exit code 0 promoted, 1 refused or switched back."""
    _print(_target().promote(dry_run, bake, say))


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (kept in `canary history`).")] = "",
    dry_run: DryRun = False,
) -> None:
    """Send the candidate to 0% at once (during a bake: the old stable takes everything back)."""
    _print(_target().rollback(reason, dry_run))


@app.command()
def shadow(
    mode: Annotated[str, typer.Argument(help="on or off.")],
    dry_run: DryRun = False,
) -> None:
    """Mirror a copy of stable traffic to the candidate (answers discarded) or stop it."""
    if mode not in ("on", "off"):
        raise CanaryError(f"shadow takes on or off, got {mode!r}")
    _print(_target().shadow(mode == "on", dry_run))


@app.command()
def status(
    as_json: JsonOut = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Redraw in place until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between redraws with --watch.")] = 2.0,
) -> None:
    """Slots, Bentos, model versions, weights, health, requests per slot, last gate verdict."""
    import json

    target = _target()
    if watch:
        from deploy.watch import watch_status

        if not 0.2 <= interval <= 600:
            raise CanaryError(f"--interval must be between 0.2 and 600 seconds, got {interval:g}")
        watch_status(target, interval)
        return
    data = target.status()
    typer.echo(json.dumps(data, indent=2) if as_json else target.format_status(data))


@app.command()
def history(as_json: JsonOut = False) -> None:
    """The audit trail: who changed what, when and why."""
    import json

    entries = _target().history()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        reason = f"  ({e['reason']})" if e.get("reason") else ""
        typer.echo(f"{e['time']}  {e['who']:<10} {e['action']:<9} {e['detail']}{reason}")


_FROM_HELP = (
    "Read this store (redis://... or postgresql://...) instead of the local stack's; "
    "its password goes in the URL or in CANARY_SERVICE_PREDICTION_LOG_PASSWORD."
)


@app.command()
def predictions(
    output: Annotated[str, typer.Option("--output", "-o", help="File to write: FILE.parquet or FILE.csv.")],
    since: Annotated[str, typer.Option("--since", help="Start: 1h, 30m, 2d (ago) or an ISO time (UTC).")] = "1h",
    until: Annotated[str, typer.Option("--until", help="End (exclusive): now, 10m (ago) or an ISO time.")] = "now",
    slot: Annotated[str | None, typer.Option("--slot", help="Only this slot's answers (blue, green).")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Only this model version's answers.")] = None,
    source: Annotated[str | None, typer.Option("--from", help=_FROM_HELP)] = None,
) -> None:
    """Export the prediction log of a time range (every answered request; posted labels joined)."""
    from deploy.predictions import export_from

    result = export_from(_home(), source, output, since, until, slot, version)
    typer.echo(f"{result.rows} predictions ({result.labelled} labelled) -> {result.path}")


def _gate_request(duration: str, users: int, spawn_rate: float, thresholds: str | None = None):
    from pathlib import Path

    from deploy.targets.base import GateRequest, parse_duration

    limits = None
    if thresholds is not None:
        _thresholds(thresholds)  # refuse a bad file before any traffic moves
        limits = Path(thresholds)
    return GateRequest(parse_duration(duration), users, spawn_rate, limits)


@app.command()
def gate(
    duration: Duration = "30s",
    users: Users = 16,
    spawn_rate: SpawnRate = 16.0,
    thresholds: Thresholds = None,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="locust: load both slots now (default); shadow: judge the copies of real "
            "requests mirrored to the candidate (`canary shadow on`) in the prediction log; live: judge "
            "the real requests each slot answered at its weight, with the labels posted for them; all: "
            "locust, then shadow (if shadow is on) and live (if the candidate has a weight), the worst decides.",
        ),
    ] = "locust",
    since: Annotated[
        str, typer.Option("--since", help="--source shadow or live: the window's start, e.g. 10m.")
    ] = "10m",
    store: Annotated[str | None, typer.Option("--from", help=_FROM_HELP)] = None,
) -> None:
    """Judge the candidate against stable: side by side under Locust load, or on shadowed real traffic.

    Exit code 0 pass, 1 fail or inconclusive, 2 the gate could not run."""
    if source == "shadow":
        _shadow_gate(since, store, _thresholds(thresholds))
        return
    if source == "live":
        _live_gate(since, store, _thresholds(thresholds))
        return
    if source == "all":
        _all_gates(_gate_request(duration, users, spawn_rate, thresholds), since, store, _thresholds(thresholds))
        return
    if source != "locust":
        raise CanaryError(f"--source must be locust, shadow, live or all, got {source!r}")
    _print(_target().gate(_gate_request(duration, users, spawn_rate, thresholds), say))


def _all_gates(request, since: str, store: str | None, limits) -> None:
    """Every source that applies, one after the other; the worst exit code is the verdict (2:
    a source could not run, 1: one failed or was inconclusive). Shadow applies when shadow is
    on, live when the candidate has a weight; a source that does not apply says why."""
    target = _target()
    typer.echo("== locust")
    applied = target.gate(request, say)
    for line in applied.lines:
        typer.echo(line)
    codes = {"locust": applied.exit_code}
    status = target.status()
    later = (
        ("shadow", bool(status.get("shadow")), "shadow is off", lambda: _shadow_gate(since, store, limits)),
        ("live", bool(status.get("weight")), "the candidate has no weight", lambda: _live_gate(since, store, limits)),
    )
    for name, applies, why_not, run in later:
        typer.echo(f"== {name}")
        if not applies:
            typer.echo(f"skipped: {why_not}")
            continue
        try:
            run()
            codes[name] = 0
        except typer.Exit as exit_:
            codes[name] = exit_.exit_code
        except CanaryError as exc:
            typer.echo(f"could not run: {exc}")
            codes[name] = 2
    words = {0: "pass", 1: "fail or inconclusive", 2: "could not run"}
    typer.echo("all: " + ", ".join(f"{name} {words.get(code, code)}" for name, code in codes.items()))
    if worst := max(codes.values()):
        raise typer.Exit(worst)


def _shadow_gate(since: str, source: str | None, limits) -> None:
    import time

    from deploy.predictions import open_log_store, parse_window, reading_log
    from deploy.shadow_diff import SETTLE_TAIL_S, SHADOW_GRACE_S, judge_shadow, pair_shadow, read_when_settled

    if _OPTIONS["target"] == "k8s" and not source:
        raise CanaryError("--source shadow on k8s reads the cluster's prediction log: give --from <its URL>")
    start, end = parse_window(since, "now")
    store, where = open_log_store(_home(), source)
    try:
        say(f"waiting {SHADOW_GRACE_S:.0f} s for the answers to the last copies")
        time.sleep(SHADOW_GRACE_S)
        with reading_log(where):
            rows = read_when_settled(lambda: store.read_range(start, end + SHADOW_GRACE_S),
                                     lambda: store.read_range(max(start, end - SETTLE_TAIL_S), end + SHADOW_GRACE_S))  # fmt: skip
            report = judge_shadow(pair_shadow(rows, end), store, limits)
    finally:
        store.close()
    _print_verdict(report)


def _live_gate(since: str, source: str | None, limits) -> None:
    from deploy.live_gate import live_gate
    from deploy.predictions import open_log_store, parse_window, reading_log

    stack = getattr(_target(), "stack", None)
    if stack is None:
        raise CanaryError(
            "--source live reads the slots' /metrics of a local or compose stack; "
            "on k8s judge real traffic with --source shadow --from <the log's URL>"
        )
    start, end = parse_window(since, "now")
    store, where = open_log_store(_home(), source)
    try:
        with reading_log(where):
            report = live_gate(stack, store, start, end, limits)
    finally:
        store.close()
    _print_verdict(report)


@app.command()
def rollout(
    steps: Annotated[str, typer.Option("--steps", help="Weight steps in percent.")] = "5,25,50,100",
    step_duration: Annotated[str, typer.Option("--step-duration", help="Gate load per step.")] = "30s",
    users: Users = 16,
    spawn_rate: SpawnRate = 16.0,
    bake: Bake = None,
    thresholds: Thresholds = None,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="What judges each step. locust: load both slots (default); live: wait --step-duration, then "
            "judge the real requests of the step (labels, errors, latency), a second look if inconclusive.",
        ),
    ] = "locust",
) -> None:
    """Walk the weight steps, gate each; roll back on a failed gate, promote (and bake) after the last."""
    from dataclasses import replace

    try:
        parsed = [int(step) for step in steps.split(",")]
    except ValueError:
        raise CanaryError(f"--steps {steps!r} must be comma-separated percentages, e.g. 5,25,50,100") from None
    if source not in ("locust", "live"):
        raise CanaryError(f"--source must be locust or live for a rollout, got {source!r}")
    request = replace(_gate_request(step_duration, users, spawn_rate, thresholds), source=source)
    _print(_target().rollout(parsed, request, bake, say))


_SLOT_HELP = (
    "Load one slot (blue or green), forced through nginx; default: nginx as clients see it, both slots at the "
    "router's weights."
)


@app.command()
def loadtest(
    slot: Annotated[str | None, typer.Option("--slot", help=_SLOT_HELP)] = None,
    workers: Annotated[int, typer.Option("--workers", help="Locust worker processes (0: users in one process).")] = 0,
    shape: Annotated[str | None, typer.Option("--shape", help="Load shape: step, spike, soak or knee.")] = None,
    headless: Annotated[
        bool, typer.Option("--headless", help="No web UI: run --duration (or the shape), write CSV + HTML reports.")
    ] = False,
    users: Annotated[int, typer.Option("--users", help="Locust users (the web UI's starting value).")] = 32,
    spawn_rate: SpawnRate = 32.0,
    duration: Annotated[str, typer.Option("--duration", help="Headless run time, e.g. 30s or 5m.")] = "1m",
    user_rate: Annotated[
        float | None, typer.Option("--user-rate", help="Requests per second per user (0: flat out; default 200).")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="Protocol mix, e.g. rest-json=3,grpc=1 (default: all four alike).")
    ] = None,
    web_port: Annotated[int, typer.Option("--web-port", help="Port of Locust's web UI (on 127.0.0.1).")] = 8089,
) -> None:
    """Locust against the running stack (loadtest/locustfile.py): V2 REST JSON and binary, V2
    gRPC and the native API, each request named by the slot and model version that answered.

    The web UI on 127.0.0.1 until Ctrl-C, or --headless: reports in <state folder>/loadtest/<time>/.
    Exit code 0 when no request failed."""
    from deploy.loadtest import LoadOptions, run_loadtest
    from deploy.targets.base import parse_duration

    options = LoadOptions(
        slot, workers, shape, headless, users, spawn_rate, parse_duration(duration), user_rate, weights, web_port
    )
    options.check()
    stack = getattr(_target(), "stack", None)
    if stack is None:
        raise CanaryError("canary loadtest runs against the local or compose stack; on a cluster see deploy/k8s/locust")
    code = run_loadtest(stack, options, say)
    if code:
        raise typer.Exit(code)


@app.command()
def containerize(
    release: Annotated[str, typer.Argument(help="Model version, @alias or Bento tag.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the Dockerfile; build nothing.")] = False,
) -> None:
    """Build the serving image digits-service:v<N> offline (Docker or Podman; dockerd is started
    when none runs): base from `canary base-image` or the official Python image, dependencies
    from a wheelhouse prepared on this machine. Prints the image, its size and largest layers."""
    from deploy.containerize import containerize as build_image
    from deploy.containerize import rendered_containerfile
    from deploy.image_settings import ImageSettings
    from models.bento import find_bento

    home = _home()
    bento, _ = find_bento(home, release)
    if dry_run:
        typer.echo(rendered_containerfile(bento))
        return
    settings = ImageSettings()
    for line in build_image(home, bento, settings, say=say).lines(settings.size_target_mb):
        typer.echo(line)


@app.command("base-image")
def base_image(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if the images exist.")] = False,
) -> None:
    """Build the images canary's containers start from, from Debian packages (no registry):
    bento-canary-base:bookworm (Python 3.11) and bento-canary-services:bookworm (Redis, nginx
    with Lua, for the compose stack). Needs root and debootstrap (`make setup`)."""
    from deploy.base_image import ensure_images
    from deploy.engine import find_engine
    from deploy.image_settings import ImageSettings

    home = _home()
    for line in ensure_images(find_engine(home, say=say), home, ImageSettings(), rebuild, say):
        typer.echo(line)


@app.command()
def doctor() -> None:
    """Which container engine and compose canary uses, whether a registry answers, which base
    images are present. Starts and builds nothing."""
    from deploy.doctor import doctor_lines

    for line in doctor_lines(_home()):
        typer.echo(line)


def main(argv: list[str] | None = None) -> None:
    # Library deprecation chatter (torch.onnx, mlflow) is not for the user of the CLI.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        # Without standalone mode, click returns a command's typer.Exit code instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except CanaryError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except click_errors.NoArgsIsHelpError:
        sys.exit(0)  # the help was shown; nothing went wrong
    except click_errors.ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
