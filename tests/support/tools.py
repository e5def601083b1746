"""The binaries the tests drive. `make setup` installs every one (deploy/system-deps.sh), so a
missing one fails its test with the command to run, instead of skipping it: a skip would let
a machine without promtool pass the suite without checking a single alert rule."""

from __future__ import annotations

import shutil

import pytest


def require_tool(*names: str, installs: str) -> str:
    """The path of the first of `names` on PATH; else the test fails saying how to get one."""
    for name in names:
        if path := shutil.which(name):
            return path
    pytest.fail(f"{' or '.join(names)} not found on PATH: run `make setup` (installs {installs})", pytrace=False)
