"""`canary`: the one command users run. Each command parses options and calls a plain function.

Domain errors (`CanaryError`) and usage errors print one line and exit 1.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

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
    from deploy.process import venv_bin

    os.execv(venv_bin("bentoml"), [venv_bin("bentoml"), "serve", bento, "--host", "127.0.0.1", "--port", str(port)])


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 15,
) -> None:
    """The whole flow once: train -> register -> export -> build -> serve -> predict."""
    from deploy.demo import run_demo

    run_demo(_home(), epochs, say)


def main(argv: list[str] | None = None) -> None:
    # Library deprecation chatter (torch.onnx, mlflow) is not for the user of the CLI.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app(args=argv, standalone_mode=False)
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
