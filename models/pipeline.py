"""The pipeline steps the `canary` commands call: train, export, build.

Each step is a plain function taking settings and options and returning a small result;
progress goes through a `say` callback so the CLI (or a test) decides where it is shown.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.errors import CanaryError
from models.export import DEFAULT_ATOL, check_parity, export_onnx, sha256_of
from models.home import CanaryHome
from models.registry import ModelVersionRef, Registry
from models.store import StoredModelRef, import_model, store_tag
from models.train import EpochReport, TrainConfig, source_scores, train
from service.core.drift import DriftReference

Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


@dataclass(frozen=True)
class TrainResult:
    ref: ModelVersionRef
    val_accuracy: float
    test_accuracy: float


def train_and_register(home: CanaryHome, config: TrainConfig, say: Say = _quiet) -> TrainResult:
    """Train one model, log it to MLflow and register it as a new version."""
    from models.data import load_split

    config.validate()
    home.create()
    registry = Registry(home)
    split = load_split()
    say(f"training {config.model}: {config.epochs} epochs, seed {config.seed}, {len(split.x_train)} digits")
    with registry.start_run(run_name=f"{config.model}-seed{config.seed}") as run:
        registry._mlflow.log_params(
            {
                "model": config.model,
                "epochs": config.epochs,
                "seed": config.seed,
                "batch_size": config.batch_size,
                "learning_rate": config.learning_rate,
                "lr_schedule": config.lr_schedule,
                "train_size": len(split.x_train),
            }
        )

        def on_epoch(r: EpochReport) -> None:
            registry._mlflow.log_metrics({"loss": r.loss, "val_accuracy": r.val_accuracy}, step=r.epoch)
            say(f"  epoch {r.epoch:>3}/{config.epochs}  loss {r.loss:.4f}  val acc {r.val_accuracy:.2%}")

        trained = train(config, split, on_epoch)
        registry._mlflow.log_metric("test_accuracy", trained.test_accuracy)
        ref = registry.log_trained(trained, split.x_test[:5])
    say(f"registered {ref.label} (run {run.info.run_id}, aliases: {', '.join(ref.aliases) or '-'})")
    return TrainResult(ref, trained.history[-1].val_accuracy, trained.test_accuracy)


@dataclass(frozen=True)
class ExportResult:
    ref: ModelVersionRef
    stored: StoredModelRef
    sha256: str
    max_abs_diff: float
    onnx_test_accuracy: float


def export_version(
    home: CanaryHome,
    version: int | None = None,
    alias: str | None = None,
    atol: float = DEFAULT_ATOL,
    say: Say = _quiet,
    quantize: str = "fp32",
    max_drop_pp: float | None = None,
) -> ExportResult:
    """Registry version -> ONNX -> parity on the test split -> BentoML store, lineage to MLflow.

    `quantize="int8"` then stores the int8 graph (`models.quantize`), refused unless it loses
    at most `max_drop_pp` (0.5) points of test accuracy. Nothing is written to MLflow or the
    BentoML store unless every check passed.
    """
    from models.quantize import MAX_DROP_PP, PRECISIONS

    if quantize not in PRECISIONS:
        raise CanaryError(f"--quantize must be one of {', '.join(PRECISIONS)}, got {quantize!r}")
    from models.data import PIXEL_RANGE, load_split

    home.require()
    registry = Registry(home)
    ref = registry.resolve(version, alias)
    say(f"loading {ref.uri} from the registry")
    flavor, model = registry.load_source(ref)
    split = load_split()
    with tempfile.TemporaryDirectory(dir=home.home) as workdir:
        onnx_file = Path(workdir) / "model.onnx"
        say(f"exporting {flavor} model to ONNX (dynamic batch) and running the ONNX checker")
        contract = export_onnx(flavor, model, onnx_file)
        say(f"checking parity with the source model on {len(split.x_test)} test digits")
        parity = check_parity(
            onnx_file, contract, source_scores(flavor, model, split.x_test), split.x_test, split.y_test, atol
        )
        accuracy, quant_tags = parity.onnx_test_accuracy, {"precision": "fp32"}
        if quantize == "int8":
            from models.quantize import check_quantized, quantize_int8

            int8_file = Path(workdir) / "int8" / "model.onnx"
            int8_file.parent.mkdir()
            say(f"quantising to int8 (static QDQ, calibrated on {min(256, len(split.x_train))} training digits)")
            quantize_int8(onnx_file, int8_file, contract, split.x_train)
            limit = MAX_DROP_PP if max_drop_pp is None else max_drop_pp
            report = check_quantized(onnx_file, int8_file, contract, split.x_test, split.y_test, limit)
            say(
                f"int8 test accuracy {report.int8_accuracy:.2%} (fp32 {report.fp32_accuracy:.2%}, "
                f"drop {report.drop_pp:.2f} points, limit {limit:g})"
            )
            onnx_file, accuracy, quant_tags = int8_file, report.int8_accuracy, report.as_tags()
        sha = sha256_of(onnx_file)
        architecture = ref.tags.get("architecture", "unknown")
        reference = DriftReference.from_inputs(split.x_train, *PIXEL_RANGE)
        stored = import_model(ref, onnx_file, contract, parity, architecture, accuracy, quant_tags, reference)
        registry.record_export(
            ref, onnx_file, {"onnx_sha256": sha, "bentoml_model": stored.tag, **parity.as_tags(), **quant_tags}
        )
    say(
        f"exported {ref.label} -> {stored.tag} ({quant_tags['precision']}): sha256 {sha[:12]}..., "
        f"max |diff| {parity.max_abs_diff:.2g}, ONNX test accuracy {accuracy:.2%}"
    )
    return ExportResult(ref, stored, sha, parity.max_abs_diff, accuracy)


def resolve_stored(home: CanaryHome, version: int | None, alias: str | None) -> tuple[ModelVersionRef, StoredModelRef]:
    """The registry version and its (integrity-checked) BentoML store entry."""
    from models.store import get_stored

    home.require()
    ref = Registry(home).resolve(version, alias)
    stored = get_stored(store_tag(ref))
    if stored.labels.get("run_id") != ref.run_id:
        raise CanaryError(f"{stored.tag} in the BentoML store does not come from {ref.label}; re-run `canary export`")
    return ref, stored
