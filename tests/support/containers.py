"""Session fixtures on the real container engine: the engine itself (dockerd started when none
runs, stopped at the end if this session started it) and the serving image of the session's
Bento, built through the real CLI (`canary containerize`) once per session.

Images are built under a repository of their own (never over a user's digits-service:vN),
and the wheelhouse and debootstrap downloads live in a cache that outlives the session, so
only the first run on a machine pays for the base images and the wheels."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.engine import DaemonRecord, Engine
from models.errors import CanaryError
from models.home import CanaryHome
from tests.support.canary_cli import CANARY

TEST_REPOSITORY = "bento-canary-test/digits-service"
IMAGE_ENV = {
    "CANARY_IMAGE_REPOSITORY": TEST_REPOSITORY,
    # not $XDG_CACHE_HOME: CanaryHome.activate points it into the session's state folder
    "CANARY_IMAGE_CACHE": str(Path.home() / ".cache" / "bento-canary-tests"),
}
BUILD_TIMEOUT_S = 1800  # cold: two debootstraps, the wheelhouse download and the build


@dataclass(frozen=True)
class BuiltImage:
    image: str
    bento: str
    model_version: str
    output: str  # what `canary containerize` printed (image, size, layers)


def canary(*args: str, timeout: float = BUILD_TIMEOUT_S, env: dict[str, str] | None = None):
    """The real CLI with the tests' image settings."""
    return subprocess.run([CANARY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **IMAGE_ENV, **(env or {})})  # fmt: skip


def containerize(release: str) -> BuiltImage:
    """`canary containerize <release>` through the CLI; the test fails with its stderr tail."""
    from models.bento import find_bento

    built = canary("containerize", release)
    if built.returncode != 0:
        pytest.fail(f"canary containerize {release} failed:\n{built.stderr[-3000:]}", pytrace=False)
    bento, version = find_bento(CanaryHome(), release)
    return BuiltImage(f"{TEST_REPOSITORY}:{bento.split(':')[1]}", bento, version, built.stdout)


@pytest.fixture(scope="session")
def container_engine(canary_home: CanaryHome) -> Iterator[Engine]:
    from deploy.engine import find_engine

    try:
        engine = find_engine(canary_home)
    except CanaryError as exc:
        pytest.fail(f"{exc} (tests/support/containers.py)", pytrace=False)
    yield engine
    record = DaemonRecord(canary_home)
    if engine.started_pid and record.alive_pid() == engine.started_pid:
        record.stop()


@pytest.fixture(scope="session")
def served_image(container_engine: Engine, built_pipeline) -> BuiltImage:
    """The session's Bento as an image, built by `canary containerize <version>`."""
    return containerize(str(built_pipeline.version))


def inspect(engine: Engine, name: str) -> dict:
    import json

    return json.loads(engine.run("inspect", name))[0]
