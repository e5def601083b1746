"""The benchmark's batch-scoring section (bench/scoring.py): how it is selected and judged.

The measurement itself (`canary score` on a million rows) runs in `make bench` only:
`python -m bench --only score` runs that section alone.
"""

from __future__ import annotations

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
