"""The real `canary` CLI as a subprocess, and the one-line error contract its failures keep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CANARY = str(Path(sys.executable).parent / "canary")


def run_canary(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CANARY, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


def canary_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run the `canary` CLI in this process (its own entry point): (exit code, stdout, stderr)."""
    from deploy.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exited:
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
