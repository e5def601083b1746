"""All runtime state lives in the state folder: nothing lands in $HOME or the working directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.canary_cli import CANARY


@pytest.mark.slow
def test_train_and_export_write_only_inside_canary_home(tmp_path):
    home, cwd, state = tmp_path / "home", tmp_path / "cwd", tmp_path / "state"
    home.mkdir()
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "BENTOML_"))}
    archives = tmp_path / "archives" / "nested"
    env.update({"HOME": str(home), "CANARY_HOME": str(state), "CANARY_BENTO_ARCHIVES": str(archives)})
    for args in (["train", "--epochs", "1"], ["export", "--version", "1"], ["build", "--version", "1"]):
        result = subprocess.run([CANARY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []
    assert list(cwd.iterdir()) == []
    assert (state / "mlflow.db").is_file()
    assert any((state / "mlartifacts").rglob("model.onnx"))
    assert any((state / "bentoml" / "models" / "digits").iterdir())
    assert [p.name for p in archives.iterdir()] == ["digits-service-v1.bento"]
    env["CANARY_BENTO_ARCHIVES"] = "/proc/no-such-folder"  # cannot be made: one line, exit 1
    refused = subprocess.run([CANARY, "build", "--version", "1"], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "cannot write Bento archives to /proc/no-such-folder" in refused.stderr, refused.stderr


def test_bento_archives_default_to_the_repository_and_follow_their_setting(monkeypatch, tmp_path):
    """`canary build` exports to the repository's bentos/ unless CANARY_BENTO_ARCHIVES says
    otherwise; this test session says otherwise, so no test build replaces a user's archive."""
    from models.home import REPO_ROOT, CanaryHome

    assert CanaryHome().bentos_dir == Path(os.environ["CANARY_HOME"]) / "bentos"
    monkeypatch.delenv("CANARY_BENTO_ARCHIVES")
    assert CanaryHome().bentos_dir == REPO_ROOT / "bentos"
    monkeypatch.setenv("CANARY_BENTO_ARCHIVES", str(tmp_path))
    assert CanaryHome().bentos_dir == tmp_path
