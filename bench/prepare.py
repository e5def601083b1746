"""Step 1: train, register, export and build both models in the benchmark's own state folder.

Uses the project's own pipeline functions, so the benchmark serves exactly what `canary
build` produces. A model whose Bento already exists in the bench home is reused unless
`fresh` is set (accuracy is irrelevant here; training digits-heavy costs a minute).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from models.home import CanaryHome
from models.pipeline import Say


class BenchHome(CanaryHome):
    """The bench's CANARY_HOME; Bento archives stay inside it, not in the repo's `bentos/`."""

    @property
    def bentos_dir(self) -> Path:
        return self.home / "bentos"


@dataclass(frozen=True)
class PreparedModel:
    architecture: str
    version: int  # MLflow registry version
    registry_uri: str  # models:/digits/<version>, what `mlflow models serve` loads
    model_tag: str  # BentoML store tag of the exported ONNX graph
    bento_tag: str  # digits-service:v<version>
    onnx_path: Path  # the one ONNX file every ONNX-based contender serves
    onnx_sha256: str
    precision: str = "fp32"
    accuracy: str = ""  # the stored graph's test accuracy (and, for int8, the fp32 one and the drop)
    int8: PreparedModel | None = None  # the same training run's int8 export, for the project's int8 row
    int8_refused: str = ""  # why the int8 export was refused (its accuracy check), when it was


def _prepared(home: BenchHome, version: int) -> PreparedModel:
    from models.pipeline import resolve_stored

    ref, stored = resolve_stored(home, version, None)
    labels = stored.labels
    precision = labels.get("precision", "fp32")
    accuracy = f"test accuracy {float(labels.get('onnx_test_accuracy', 'nan')):.2%}"
    if precision == "int8":
        accuracy += (
            f" (fp32 {float(labels['fp32_test_accuracy']):.2%}, drop {float(labels['int8_accuracy_drop_pp']):.2f} "
            f"points, argmax agreement {float(labels['int8_argmax_agreement']):.2%})"
        )
    return PreparedModel(
        architecture=ref.tags.get("architecture", "?"),
        version=ref.version,
        registry_uri=ref.uri,
        model_tag=stored.tag,
        bento_tag=f"digits-service:v{ref.version}",
        onnx_path=stored.path,
        onnx_sha256=labels["sha256"],
        precision=precision,
        accuracy=accuracy,
    )


def find_reusable(
    home: BenchHome, architecture: str, precision: str = "fp32", recipe: str | None = None
) -> PreparedModel | None:
    """The newest registered version of `architecture` whose export (of `precision`) and Bento
    exist, trained by `recipe` when one is given (see `training_recipe`)."""
    import bentoml
    from bentoml.exceptions import NotFound

    from models.errors import CanaryError
    from models.registry import Registry
    from service.core.drift import REFERENCE_FILE

    if not (home.home / "mlflow.db").is_file():
        return None
    registry = Registry(home)
    versions = registry.client.search_model_versions(f"name='{home.registered_model}'")
    for version in sorted(
        (int(v.version) for v in versions if (v.tags or {}).get("architecture") == architecture), reverse=True
    ):
        marker = _recipe_file(home, version)
        if recipe is not None and (not marker.is_file() or marker.read_text().strip() != recipe):
            continue  # trained another way (or by an older network definition): not this run's model
        try:
            bentoml.bentos.get(f"digits-service:v{version}")
            prepared = _prepared(home, version)
        except (NotFound, CanaryError):
            continue
        if prepared.precision == precision and (Path(prepared.onnx_path).parent / REFERENCE_FILE).is_file():
            return prepared  # (an export older than the stored training reference is not reused: drift needs it)
    return None


def serving_source_digest() -> str:
    """sha256 of what a Bento carries from this checkout: the service code and bentofile.yaml."""
    import hashlib

    from models.home import REPO_ROOT

    digest = hashlib.sha256()
    for path in sorted([*(REPO_ROOT / "service").rglob("*.py"), REPO_ROOT / "bentofile.yaml"]):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _source_file(home: BenchHome, version: int) -> Path:
    return home.home / "bench-bentos" / f"v{version}.source-sha256"


def _recipe_file(home: BenchHome, version: int) -> Path:
    return home.home / "bench-bentos" / f"v{version}.recipe-sha256"


def training_recipe(config: object) -> str:
    """sha256 of how a model is trained: the training config and the code that defines the
    networks and the loop. A reused model must have been trained the same way."""
    import hashlib

    from models.home import REPO_ROOT

    digest = hashlib.sha256(repr(config).encode())
    for name in ("nets.py", "train.py"):
        digest.update((REPO_ROOT / "models" / name).read_bytes())
    return digest.hexdigest()


def prepare_model(
    home: BenchHome, architecture: str, epochs: int, fresh: bool, say: Say, int8: bool = False,
    learning_rate: float | None = None, lr_schedule: str = "constant",
) -> PreparedModel:  # fmt: skip
    """`prepare_one` for fp32 and, with `int8`, again for an int8 export of the same
    (deterministic) training run, attached as `.int8`."""
    from dataclasses import replace

    from models.errors import CanaryError

    fp32 = prepare_one(home, architecture, epochs, fresh, say, learning_rate=learning_rate, lr_schedule=lr_schedule)
    if not int8:
        return fp32
    try:
        int8_model = prepare_one(
            home,
            architecture,
            epochs,
            fresh,
            say,
            precision="int8",
            learning_rate=learning_rate,
            lr_schedule=lr_schedule,
        )
    except CanaryError as exc:  # the export's accuracy check said no: a finding, the fp32 rows still run
        say(f"int8 export refused: {exc}")
        return replace(fp32, int8_refused=str(exc))
    return replace(fp32, int8=int8_model)


def prepare_one(
    home: BenchHome, architecture: str, epochs: int, fresh: bool, say: Say, precision: str = "fp32",
    learning_rate: float | None = None, lr_schedule: str = "constant",
) -> PreparedModel:  # fmt: skip
    """Reuse, or train -> register -> export -> build one architecture. A reused model's
    Bento is rebuilt when the serving code changed since it was built (never a stale Bento)."""
    from models.bento import build_bento
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    config = TrainConfig(model=architecture, epochs=epochs, seed=0, lr_schedule=lr_schedule)
    if learning_rate:
        config = dataclasses.replace(config, learning_rate=learning_rate)
    recipe = training_recipe(config)
    source = serving_source_digest()
    reusable = None if fresh else find_reusable(home, architecture, precision, recipe)
    if reusable is not None:
        marker = _source_file(home, reusable.version)
        if not marker.exists() or marker.read_text().strip() != source:
            say(f"reusing {architecture} version {reusable.version}; the serving code changed: rebuilding its Bento")
            build_bento(home, version=reusable.version, say=say)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(source)
            return _prepared(home, reusable.version)
        say(
            f"reusing {architecture}: registry version {reusable.version}, Bento {reusable.bento_tag} (--fresh retrains)"
        )
        return reusable
    trained = train_and_register(home, config, say)
    export_version(home, version=trained.ref.version, say=say, quantize=precision)
    build_bento(home, version=trained.ref.version, say=say)
    marker = _source_file(home, trained.ref.version)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(source)
    _recipe_file(home, trained.ref.version).write_text(recipe)
    return _prepared(home, trained.ref.version)
