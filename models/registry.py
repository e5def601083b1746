"""The MLflow side of the pipeline: training runs, registered versions, aliases, lineage.

The embedded default is MLflow on SQLite inside the state folder; `MLFLOW_TRACKING_URI`
points at a real tracking server instead. All access goes through `Registry`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import CanaryError, IntegrityError, NotFoundError
from models.home import CanaryHome
from models.train import TrainedModel
from service.core.runner import file_sha256

CHAMPION = "champion"
CHALLENGER = "challenger"
# The copy of each version that loads without running code, and its sha256 (version tags).
SAFE_FOLDER, SAFE_TAG, SAFE_SHA256_TAG = "safe", "safe_artifact", "safe_artifact_sha256"
# Requirements written next to each logged model, so MLflow never has to infer them
# (inference loads the model in a subprocess and takes tens of seconds).
_PIP_REQUIREMENTS = {
    "pytorch": ["torch==2.13.0", "numpy"],
    "sklearn": ["scikit-learn", "numpy"],
}


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, as the rest of the pipeline needs to see it."""

    name: str
    version: int
    run_id: str
    aliases: tuple[str, ...]
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"


class Registry:
    """MLflow tracking + model registry for one registered model name."""

    def __init__(self, home: CanaryHome) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.home = home
        self.name = home.registered_model
        mlflow.set_tracking_uri(home.mlflow_uri)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=home.mlflow_uri)

    # -- training runs -------------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.home.experiment)
        if exp is not None:
            return exp.experiment_id
        location = self.home.artifacts.resolve().as_uri() if self.home.embedded else None
        return self.client.create_experiment(self.home.experiment, artifact_location=location)

    def start_run(self, run_name: str) -> Any:
        return self._mlflow.start_run(experiment_id=self.experiment_id(), run_name=run_name)

    def log_trained(self, trained: TrainedModel, example: Any) -> ModelVersionRef:
        """Log the model (signature + input example) in the active run and register it."""
        from mlflow.models import infer_signature

        signature = infer_signature(example, trained.scores(example))
        flavor_module = getattr(self._mlflow, trained.flavor)
        # Pickle keeps the nn.Module (the pt2 default is an ExportedProgram specialised to
        # the example's batch size, which the ONNX export with a dynamic batch cannot use).
        extra = {"serialization_format": "pickle"} if trained.flavor == "pytorch" else {}
        info = flavor_module.log_model(
            trained.model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=_PIP_REQUIREMENTS[trained.flavor],
            registered_model_name=self.name,
            **extra,
        )
        version = int(info.registered_model_version)
        self.client.set_model_version_tag(self.name, str(version), "architecture", trained.config.model)
        self.client.set_model_version_tag(self.name, str(version), "flavor", trained.flavor)
        self._log_safe_copy(trained, version)
        existing = self.client.get_registered_model(self.name).aliases
        alias = CHALLENGER if CHAMPION in existing else CHAMPION
        self.client.set_registered_model_alias(self.name, alias, str(version))
        return self.get(version)

    # -- lookups ------------------------------------------------------------------------
    def get(self, version: int) -> ModelVersionRef:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise NotFoundError(f"model version {self.name}/{version} does not exist ({self._known()})") from None
        return ModelVersionRef(
            self.name, int(mv.version), mv.run_id or "", tuple(mv.aliases or ()), dict(mv.tags or {})
        )

    def resolve(self, version: int | None = None, alias: str | None = None) -> ModelVersionRef:
        """A version by number or alias; refuses versions whose training run did not finish."""
        from mlflow.exceptions import MlflowException

        if (version is None) == (alias is None):
            raise CanaryError("give exactly one of --version N or --alias NAME")
        if alias is not None:
            try:
                mv = self.client.get_model_version_by_alias(self.name, alias)
            except MlflowException:
                raise NotFoundError(f"alias {alias!r} is not set on model {self.name!r} ({self._known()})") from None
            version = int(mv.version)
        ref = self.get(int(version))  # type: ignore[arg-type]
        status = self.client.get_run(ref.run_id).info.status if ref.run_id else "UNKNOWN"
        if status != "FINISHED":
            raise CanaryError(
                f"{ref.label} comes from run {ref.run_id or '?'} which did not finish (status {status}); retrain it"
            )
        return ref

    def _known(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name='{self.name}'"))
        except MlflowException:
            versions = []
        return f"known versions: {', '.join(map(str, versions))}" if versions else "no versions registered yet"

    def _log_safe_copy(self, trained: TrainedModel, version: int) -> None:
        """Next to MLflow's own (pickled) model, in the active run: a copy that loads without
        running code (the PyTorch state dict, the scikit-learn pipeline as skops), and its
        sha256 as a model version tag. Export reads only this copy."""
        with tempfile.TemporaryDirectory() as folder:
            if trained.flavor == "pytorch":
                import torch

                path = Path(folder) / "weights.pt"
                torch.save(trained.model.state_dict(), path)
            else:
                import skops.io

                path = Path(folder) / "model.skops"
                skops.io.dump(trained.model, path)
            self._mlflow.log_artifact(str(path), artifact_path=SAFE_FOLDER)
            for key, value in ((SAFE_TAG, f"{SAFE_FOLDER}/{path.name}"), (SAFE_SHA256_TAG, file_sha256(path))):
                self.client.set_model_version_tag(self.name, str(version), key, value)

    def load_source(self, ref: ModelVersionRef) -> tuple[str, Any]:
        """The source model of a version and its flavor ("pytorch" or "sklearn"), from the safe
        copy only: its sha256 is checked against the tag, PyTorch weights are loaded with
        `weights_only=True` into the architecture the tag names, scikit-learn through skops,
        which refuses any type it does not trust. Nothing is unpickled."""
        flavor, artifact, digest = (ref.tags.get(key) for key in ("flavor", SAFE_TAG, SAFE_SHA256_TAG))
        if flavor not in ("pytorch", "sklearn") or not artifact or not digest:
            raise CanaryError(
                f"{ref.label} has no weights that load without running code (registered before pickled models "
                "were refused); retrain it with `canary train`"
            )
        with tempfile.TemporaryDirectory() as folder:
            local = Path(self._mlflow.artifacts.download_artifacts(
                run_id=ref.run_id, artifact_path=artifact, dst_path=folder
            ))  # fmt: skip
            actual = file_sha256(local)
            if actual != digest:
                raise IntegrityError(
                    f"{ref.label}: {artifact} has sha256 {actual[:12]}..., the registry says {digest[:12]}..."
                )
            return flavor, _load_safe(flavor, ref.tags.get("architecture", ""), local, ref.label)

    # -- lineage written back by export -------------------------------------------------
    def record_export(self, ref: ModelVersionRef, onnx_file: Path, figures: dict[str, str]) -> None:
        self.client.log_artifact(ref.run_id, str(onnx_file), artifact_path=f"onnx/v{ref.version}")
        for key, value in figures.items():
            self.client.set_model_version_tag(self.name, str(ref.version), key, value)

    def set_alias(self, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))


def _load_safe(flavor: str, architecture: str, path: Path, label: str) -> Any:
    if flavor == "pytorch":
        import torch

        from models.nets import TORCH_ARCHITECTURES

        if architecture not in TORCH_ARCHITECTURES:
            raise CanaryError(f"{label}: unknown architecture {architecture!r} (known: {sorted(TORCH_ARCHITECTURES)})")
        model = TORCH_ARCHITECTURES[architecture]()
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
        except Exception as exc:  # noqa: BLE001 - weights_only refusals and shape mismatches come as several types
            raise IntegrityError(
                f"{label}: refused to load the weights into {architecture}: {_first_line(exc)}"
            ) from None
        return model.eval()
    import skops.io

    try:
        return skops.io.load(path)  # trusts only the types skops knows to be safe
    except Exception as exc:  # noqa: BLE001 - untrusted types and broken files alike
        raise IntegrityError(f"{label}: refused to load the scikit-learn model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
