"""The benchmark's batch-scoring section (bench/scoring.py): how it is selected and judged.

The measurement itself (`canary score` on a million rows) runs in `make bench` only:
`python -m bench --only score` runs that section alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.__main__ import parse_args
from bench.scoring import ScoringResult

pytestmark = pytest.mark.slow


def test_only_score_selects_the_section_alone_and_the_default_runs_it_too():
    alone = parse_args(["--only", "score", "--score-rows", "5000"])
    assert alone.contenders == () and alone.scoring and alone.scoring_rows == 5000
    mixed = parse_args(["--only", "bento", "score"])
    assert mixed.contenders == ("bento",) and mixed.scoring
    assert parse_args([]).scoring and parse_args([]).scoring_rows == 1_000_000
    assert not parse_args(["--only", "bento"]).scoring
    assert parse_args(["--quick", "--only", "score"]).scoring_rows == 100_000


@pytest.mark.parametrize(
    ("rows_per_s", "peak", "verdicts"), [(80_000, 400, ("pass", "pass")), (60_000, 1500, ("FAIL", "FAIL"))]
)
def test_targets_are_judged_against_the_limit_and_one_gib(rows_per_s, peak, verdicts):
    result = ScoringResult("digits-cnn", 1, 1_000_000, 21, 10.0, 20.0, rows_per_s, peak, 100_000.0, 0.05)
    lines = result.markdown().splitlines()
    assert lines[-2].endswith(verdicts[0]) and "(target >= 0.7)" in lines[-2]
    assert lines[-1].endswith(verdicts[1]) and "(target < 1024)" in lines[-1]
    assert result.as_dict()["vs_limit"] == pytest.approx(rows_per_s / 100_000)


def _touch_mib(mib: int) -> bytearray:
    block = bytearray(mib * 2**20)
    for i in range(0, len(block), 4096):  # resident, not only reserved
        block[i] = 1
    return block


ALLOCATE_100_MIB = "b = bytearray(100 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"


def launched(usage_file, code: str, **run) -> subprocess.CompletedProcess:
    """`python -c code` run through the launcher."""
    argv = [sys.executable, "-m", "bench.child_usage", str(usage_file), sys.executable, "-c", code]
    return subprocess.run(argv, check=False, **run)


def test_the_peak_memory_is_the_commands_own_not_the_benchmarks(tmp_path):
    """The kernel counts a spawning process's memory in its child's max RSS (vfork + exec): with
    the benchmark holding 600 MiB, a command that peaks near 110 MiB read 600+. Through the
    launcher it reads its own."""
    held = _touch_mib(600)
    direct = subprocess.Popen([sys.executable, "-c", ALLOCATE_100_MIB])
    _, _, usage = os.wait4(direct.pid, 0)
    assert usage.ru_maxrss / 1024 >= 600  # the defect the launcher exists for, on this kernel

    usage_file = tmp_path / "usage.json"
    code = launched(usage_file, ALLOCATE_100_MIB).returncode
    measured = json.loads(usage_file.read_text())
    assert code == 0 and measured["exit_code"] == 0
    assert 100 <= measured["max_rss_kib"] / 1024 < 300
    assert measured["user_s"] + measured["system_s"] > 0
    del held


def test_the_launcher_passes_on_the_commands_exit_code_and_output(tmp_path):
    usage_file = tmp_path / "usage.json"
    run = launched(usage_file, "print('scored'); raise SystemExit(3)", capture_output=True, text=True)
    assert (run.returncode, run.stdout, json.loads(usage_file.read_text())["exit_code"]) == (3, "scored\n", 3)
    killed = launched(usage_file, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == 128 + 9 and json.loads(usage_file.read_text())["exit_code"] == -9
