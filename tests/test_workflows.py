"""The CI workflow for users of the repo is valid GitHub Actions and runs the README's checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def test_workflow_validates_against_the_github_actions_schema():
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflow_runs_lint_test_bento_and_the_image_on_tags():
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    commands = {name: " ".join(step.get("run", "") for step in job["steps"]) for name, job in jobs.items()}
    assert "make lint" in commands["lint"] and "make test" in commands["test"]
    assert "canary build" in commands["bento"]
    assert "canary containerize" in commands["image"] and "refs/tags/" in jobs["image"]["if"]
