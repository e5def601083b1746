"""Test session set-up: an isolated state folder, set before bentoml or mlflow is imported."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must run before any test module imports bentoml (it reads BENTOML_HOME at import).
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="canary-test-home-"))
os.environ["CANARY_HOME"] = str(_SESSION_HOME)
# Bento archives too: the session's builds (registry versions 1, 2, ...) would otherwise
# replace the archives a user's `make demo` or `canary build` left in the repository's bentos/.
os.environ["CANARY_BENTO_ARCHIVES"] = str(_SESSION_HOME / "bentos")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from models.home import CanaryHome  # noqa: E402

CanaryHome().activate()

import pytest  # noqa: E402

_SESSION_PID = os.getpid()


def _remove_session_home() -> None:
    """The session's state folder goes with it (36 MB a run); CANARY_KEEP_TEST_HOME=1 keeps it to
    look into. Not from a forked child, which would take it from the running session."""
    if os.getpid() == _SESSION_PID and os.environ.get("CANARY_KEEP_TEST_HOME") != "1":
        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


# at exit, not in pytest_unconfigure: a usage error (an unknown option) ends the run before
# pytest configures, and left an empty folder behind in /tmp every time
atexit.register(_remove_session_home)


@pytest.fixture(scope="session")
def canary_home() -> CanaryHome:
    home = CanaryHome()
    home.create()
    return home


from tests.support.containers import container_engine, served_image  # noqa: E402,F401
from tests.support.pipeline import built_pipeline, second_version, served, serving, session_redis  # noqa: E402,F401
