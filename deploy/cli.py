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
    rest_port: Annotated[int, typer.Option(help="V2 REST listener, the fast path (0 = off).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="V2 gRPC port (0 = off).")] = 50051,
) -> None:
    """Serve a built Bento in the foreground (Ctrl-C stops it)."""
    import os

    home = _home()
    home.require()
    from deploy.process import venv_bin

    os.environ["CANARY_SERVICE_REST_PORT"] = str(rest_port)
    os.environ["CANARY_SERVICE_GRPC_PORT"] = str(grpc_port)
    argv = [venv_bin("bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)]
    os.execv(argv[0], argv)  # noqa: S606  # nosec B606 - become the server; fixed argv


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
) -> None:
    """The whole flow once: train -> register -> export -> build -> serve -> predict."""
    from deploy.demo import run_demo

    run_demo(_home(), epochs, say)


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


def _gate_request(duration: str, users: int, spawn_rate: float, thresholds: str | None = None):
    from pathlib import Path

    from deploy.targets.base import GateRequest, parse_duration

    limits = None
    if thresholds is not None:
        import yaml

        from loadtest.gate import GateThresholds

        limits = Path(thresholds)
        try:
            GateThresholds.from_yaml(limits)  # refuse a bad file before any traffic moves
        except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
            raise CanaryError(f"--thresholds {thresholds}: {' '.join(str(exc).split())}") from None
    return GateRequest(parse_duration(duration), users, spawn_rate, limits)


@app.command()
def gate(
    duration: Duration = "30s", users: Users = 16, spawn_rate: SpawnRate = 16.0, thresholds: Thresholds = None
) -> None:
    """Load stable and candidate side by side with Locust and judge the candidate.

    Exit code 0 pass, 1 fail or inconclusive, 2 the gate could not run."""
    _print(_target().gate(_gate_request(duration, users, spawn_rate, thresholds), say))


@app.command()
def rollout(
    steps: Annotated[str, typer.Option("--steps", help="Weight steps in percent.")] = "5,25,50,100",
    step_duration: Annotated[str, typer.Option("--step-duration", help="Gate load per step.")] = "30s",
    users: Users = 16,
    spawn_rate: SpawnRate = 16.0,
    bake: Bake = None,
    thresholds: Thresholds = None,
) -> None:
    """Walk the weight steps, gate each; roll back on a failed gate, promote (and bake) after the last."""
    try:
        parsed = [int(step) for step in steps.split(",")]
    except ValueError:
        raise CanaryError(f"--steps {steps!r} must be comma-separated percentages, e.g. 5,25,50,100") from None
    _print(_target().rollout(parsed, _gate_request(step_duration, users, spawn_rate, thresholds), bake, say))


@app.command()
def containerize(
    release: Annotated[str, typer.Argument(help="Model version, @alias or Bento tag.")],
    dry_run: DryRun = False,
) -> None:
    """Build the serving image (wraps `bentoml containerize`; needs Docker or Podman)."""
    from deploy.containerize import containerize as build_image
    from deploy.containerize import rendered_containerfile
    from models.bento import find_bento

    bento, _ = find_bento(_home(), release)
    typer.echo(rendered_containerfile(bento) if dry_run else build_image(bento))


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
