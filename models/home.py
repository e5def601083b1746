"""The state folder: where every piece of runtime state lives.

One folder (default `.canary/` in the repository, `CANARY_HOME` to move it) holds the
MLflow SQLite database and artifacts, the BentoML home, logs and pid files, so nothing is
written to `$HOME` and `make clean` removes all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import NotFoundError

REPO_ROOT = Path(__file__).resolve().parents[1]


class CanaryHome(BaseSettings):
    """Settings of the state folder and the model registry, read once from the environment."""

    model_config = SettingsConfigDict(env_prefix="CANARY_", extra="ignore", frozen=True)

    home: Path = Field(
        default=REPO_ROOT / ".canary",
        description="The state folder (env CANARY_HOME).",
    )
    registered_model: str = Field(
        default="digits",
        description="Name of the MLflow registered model every training run adds a version to.",
    )
    experiment: str = Field(default="digits", description="MLflow experiment of training runs.")
    tracking_uri: str | None = Field(
        default=None,
        validation_alias="MLFLOW_TRACKING_URI",
        description="A real MLflow tracking server; default is SQLite inside the state folder.",
    )
    bento_archives: Path | None = Field(
        default=None,
        description="Where `canary build` exports Bento archives (env CANARY_BENTO_ARCHIVES); default "
        "the repository's bentos/. The test suite points it into its own state folder, so a test "
        "build never replaces a user's bentos/digits-service-vN.bento.",
    )

    @property
    def embedded_uri(self) -> str:
        return f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.tracking_uri or self.embedded_uri

    @property
    def embedded(self) -> bool:
        """True when MLflow is the SQLite store in the state folder (artifacts live there too)."""
        return self.mlflow_uri == self.embedded_uri

    @property
    def artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def bentos_dir(self) -> Path:
        return self.bento_archives or REPO_ROOT / "bentos"

    def activate(self) -> None:
        """Point every library at the state folder. Call before importing bentoml or mlflow."""
        os.environ["BENTOML_HOME"] = str(self.bentoml_home)
        os.environ["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("TORCH_HOME", str(self.home / "torch"))
        os.environ.setdefault("MPLCONFIGDIR", str(self.home / "matplotlib"))
        # onnxruntime (and others) keep a device-id/cache under $XDG_CACHE_HOME or ~/.cache.
        os.environ["XDG_CACHE_HOME"] = str(self.home / "cache")

    def create(self) -> None:
        """Create the state folder (only training does; it is the pipeline's first step)."""
        for path in (self.home, self.artifacts, self.bentoml_home, self.logs, self.run_dir):
            path.mkdir(parents=True, exist_ok=True)

    def require(self) -> None:
        """Fail with one line when the state folder does not exist yet."""
        if not self.home.is_dir():
            raise NotFoundError(f"no state folder at {self.home}: run `canary train` first (or set CANARY_HOME)")
