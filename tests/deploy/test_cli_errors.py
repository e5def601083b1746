"""Bad input to the `canary` CLI: one clear line, exit code 1, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.home import CanaryHome
from models.registry import Registry
from tests.support.canary_cli import assert_one_line_error, run_canary

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("train", "--epochs", "0"), "at least 1"),
        (("train", "--epochs", "abc"), "--epochs"),
        (("train", "--model", "resnet"), "unknown model"),
        (("export", "--version", "999"), "does not exist"),
        (("export", "--alias", "nope"), "alias 'nope'"),
        (("export",), "exactly one"),
        (("build", "--version", "999"), "does not exist"),
        (("build", "--version", "1", "--bogus"), "No such option"),
        (("nosuch",), "No such command"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_1(args, fragment, built_pipeline):
    assert_one_line_error(run_canary(*args), fragment)


def test_missing_state_folder_is_one_line(tmp_path):
    missing = tmp_path / "not-here"
    result = run_canary("export", "--version", "1", env={"CANARY_HOME": str(missing)})
    assert_one_line_error(result, "no state folder")
    assert not missing.exists()


def test_version_from_a_run_that_never_finished_is_refused(canary_home: CanaryHome, built_pipeline):
    registry = Registry(canary_home)
    source = registry.client.get_model_version("digits", str(built_pipeline.version)).source
    run = registry.client.create_run(registry.experiment_id(), run_name="crashed-midway")  # stays RUNNING
    version = registry.client.create_model_version("digits", source, run_id=run.info.run_id).version
    assert_one_line_error(run_canary("export", "--version", str(version)), "did not finish")
    import bentoml
    from bentoml.exceptions import NotFound

    with pytest.raises(NotFound):
        bentoml.models.get(f"digits:v{version}")


def test_corrupt_onnx_in_the_store_is_refused_by_build(canary_home: CanaryHome):
    import bentoml
    from bentoml.exceptions import NotFound

    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    trained = train_and_register(canary_home, TrainConfig(epochs=1, seed=11))
    exported = export_version(canary_home, version=trained.ref.version)
    onnx_file = Path(bentoml.models.get(exported.stored.tag).path_of("model.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:100] + b"garbage")

    assert_one_line_error(run_canary("build", "--version", str(trained.ref.version)), "corrupt")
    with pytest.raises(NotFound):
        bentoml.bentos.get(f"digits-service:v{trained.ref.version}")
