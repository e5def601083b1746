"""`canary`: the one command users run. Each command parses options and calls a plain function.

Domain errors (`CanaryError`) and usage errors print one line and exit 1.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import click
import typer

from models.errors import CanaryError
from models.home import CanaryHome

app = typer.Typer(
    name="canary",
    help="Train, export, build, serve and release digit-classifier Bentos.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Version = Annotated[Optional[int], typer.Option("--version", "-v", help="Registry version number.")]
Alias = Annotated[Optional[str], typer.Option("--alias", "-a", help="Registry alias, e.g. champion.")]


def _home() -> CanaryHome:
    home = CanaryHome()
    home.activate()
    return home


def say(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="digits-cnn, digits-heavy or digits-linear (scikit-learn).")] = "digits-cnn",
    epochs: Annotated[int, typer.Option(help="Training epochs (at least 1).")] = 8,
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
def export(version: Version = None, alias: Alias = None) -> None:
    """Export a registry version to ONNX, check parity, import it into the BentoML store."""
    from models.pipeline import export_version

    result = export_version(_home(), version, alias, say=say)
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
    port: Annotated[int, typer.Option(help="HTTP port.")] = 3000,
) -> None:
    """Serve a built Bento in the foreground (Ctrl-C stops it)."""
    import os

    home = _home()
    home.require()
    os.execvp("bentoml", ["bentoml", "serve", bento, "--host", "127.0.0.1", "--port", str(port)])


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 8,
) -> None:
    """The whole flow once: train -> register -> export -> build -> serve -> predict."""
    from deploy.demo import run_demo

    run_demo(_home(), epochs, say)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except CanaryError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except click.UsageError as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
