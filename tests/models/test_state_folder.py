"""All runtime state lives in the state folder: nothing lands in $HOME or the working directory."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.canary_cli import CANARY


@pytest.mark.slow
def test_train_and_export_write_only_inside_canary_home(tmp_path):
    home, cwd, state = tmp_path / "home", tmp_path / "cwd", tmp_path / "state"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BENTOML_"))}
    env.update({"HOME": str(home), "CANARY_HOME": str(state)})
    for args in (["train", "--epochs", "1"], ["export", "--version", "1"]):
        result = subprocess.run([CANARY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []
    assert list(cwd.iterdir()) == []
    assert (state / "mlflow.db").is_file()
    assert any((state / "mlartifacts").rglob("model.onnx"))
    assert any((state / "bentoml" / "models" / "digits").iterdir())
