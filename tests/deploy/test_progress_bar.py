"""`RowProgress` off a terminal (logs, CI, pipes): a line per tenth of the rows, never a redraw."""

from __future__ import annotations

from deploy.progress_bar import RowProgress


def test_off_a_terminal_progress_is_one_line_per_tenth():
    lines: list[str] = []
    with RowProgress(lines.append, interactive=False) as progress:
        for done in range(0, 1001, 7):
            progress(done, 1000)
        progress(1000, 1000)
    assert len(lines) == 10
    assert lines[0] == "  scoring: 105/1,000 rows (10%)" and lines[-1] == "  scoring: 1,000/1,000 rows (100%)"


def test_an_unknown_total_prints_nothing_off_a_terminal():
    lines: list[str] = []
    with RowProgress(lines.append, interactive=False) as progress:
        progress(500, None)
    assert lines == []
