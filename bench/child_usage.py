"""Run a command and record its own CPU time and peak memory:
`python -m bench.child_usage USAGE_JSON COMMAND [ARG ...]`; exits with the command's code.

Why a launcher: the kernel's max RSS for a child counts the memory of the process that spawned
it. Python spawns with vfork, and exec keeps the old address space's high-water mark in the new
program's account, so every child of a 1 GiB benchmark process read at least 1 GiB (the
batch-scoring row said 1,126-1,161 MiB for a command that peaks near 540 MiB). Spawned from this
small interpreter, the command's max RSS is its own, or this launcher's (about 10 MiB) if that is
larger. Imports only the standard library, to stay small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run(usage_path: Path, command: list[str]) -> int:
    """Run `command` with this process's stdio, write its rusage to `usage_path`, return its code."""
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    usage_path.write_text(
        json.dumps(
            {
                "exit_code": code,
                "max_rss_kib": usage.ru_maxrss,  # KiB on Linux
                "user_s": usage.ru_utime,
                "system_s": usage.ru_stime,
            }
        )
    )
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bench.child_usage USAGE_JSON COMMAND [ARG ...]", file=sys.stderr)
        return 2
    return run(Path(argv[0]), argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
