"""deploy/containerize.py: engine detection with the real CLIs, the image tag, and the exact
Dockerfile `bentoml containerize` would build for a real Bento (rendered without an engine)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from deploy.containerize import (
    ENGINES,
    INSTALL_HINT,
    Engine,
    containerize,
    find_engine,
    image_tag,
    rendered_containerfile,
)
from models.errors import CanaryError


@pytest.fixture
def no_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This machine's situation, made certain: the docker CLI (if any) without a daemon, and
    no podman or buildctl on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = shutil.which("docker")
    if docker:
        (bin_dir / "docker").symlink_to(docker)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
    return bin_dir


def test_no_working_engine_is_one_line_saying_what_to_install(no_engine):
    with pytest.raises(CanaryError) as error:
        find_engine()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("no container engine found (docker, podman or buildkit): docker")
    assert "podman not installed; buildctl not installed" in message
    assert message.endswith(INSTALL_HINT)
    if (no_engine / "docker").exists():  # the real CLI ran and said why
        assert "not installed" not in message.split(";")[0]


def test_containerize_stops_before_bentoml_when_no_engine_answers(no_engine):
    with pytest.raises(CanaryError, match=r"^no container engine found"):
        containerize("digits-service:v3")


def test_the_first_engine_that_answers_is_used():
    false, true = shutil.which("false"), shutil.which("true")
    assert false and true
    engine = find_engine([Engine("broken", (false,)), Engine("working", (true,)), Engine("later", (true,))])
    assert engine.backend == "working"
    assert [engine.backend for engine in ENGINES] == ["docker", "podman", "buildctl"]


def test_the_image_is_tagged_with_the_bentos_version():
    assert image_tag("digits-service:v3") == "digits-service:v3"
    for bad in ("digits-service", "digits-service:latest", "other-service:v3"):
        with pytest.raises(CanaryError, match="^expected a built Bento tag like digits-service:v3, got"):
            image_tag(bad)


@pytest.mark.slow
def test_the_built_bentos_dockerfile_is_slim_non_root_with_both_ports_and_a_healthcheck(built_pipeline):
    dockerfile = rendered_containerfile(built_pipeline.bento_tag).replace("\\\n", " ")  # join continued lines
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if re.match(r"^[A-Z]+\s", line)]
    users = [arg for op, arg in instructions if op == "USER"]
    # The last USER is the one the container runs as; BentoML's own is the name `bentoml`.
    assert users and users[-1] == "1034:1034", "bentofile.yaml: docker.dockerfile_template missing?"
    assert {arg for op, arg in instructions if op == "EXPOSE"} >= {"3000", "8000", "50051"}
    (healthcheck,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert re.search(r"CMD .*http://127\.0\.0\.1:3000/v2/health/ready", healthcheck)
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert re.match(r"python:3\.11-slim", base)
    assert "build-essential" not in dockerfile  # no compiler in the serving image
    assert any(op == "ENV" and arg.startswith("CANARY_SERVICE_GRPC_HOST=") for op, arg in instructions)


def test_rendering_an_unknown_bento_is_one_line(canary_home):
    with pytest.raises(CanaryError, match=r"^Bento digits-service:v999 is not built: run `canary build` first$"):
        rendered_containerfile("digits-service:v999")
