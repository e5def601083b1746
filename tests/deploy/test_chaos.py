"""`make chaos`'s bookkeeping without a stack: the table, the report, Locust's statistics,
the split check, the chosen releases and the settings handed to `canary` subprocesses."""

from __future__ import annotations

import json

import pytest

from deploy.chaos import (
    PORT_FIELDS,
    DrillResult,
    Release,
    chaos_settings,
    count,
    exit_code,
    one_line,
    pick_releases,
    read_locust_json,
    render_markdown,
    render_text,
    split_matches,
    stack_env,
    top_failure,
)
from deploy.stack import StackSettings
from models.errors import CanaryError

RESULTS = [
    DrillResult("candidate SIGKILLed at 30%", 9830, 0, "0 of 9,830 unforced requests reached green", True),
    DrillResult("nginx restarted", 1200, 12, "12 failed | connection refused", False),
    DrillResult("drill that broke", None, None, "the drill broke: boom", False),
]


def test_counts_have_thousands_separators_and_a_dash_for_unmeasured():
    assert count(9830) == "9,830" and count(0) == "0" and count(None) == "-"


def test_the_exit_code_is_1_when_any_drill_is_not_ok_or_none_ran():
    assert exit_code(RESULTS[:1]) == 0
    assert exit_code(RESULTS) == 1
    assert exit_code([]) == 1
    assert [r.verdict for r in RESULTS] == ["ok", "NOT OK", "NOT OK"]


def test_the_text_table_aligns_columns_and_keeps_the_whole_outcome():
    lines = render_text(RESULTS).splitlines()
    assert lines[0].split() == ["#", "fault", "requests", "sent", "failed", "verdict", "outcome"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = lines[2:]
    assert len(rows) == 3
    # every column starts at the same place on every row: the verdict column lines up
    assert len({row.index(verdict) for row, verdict in zip(rows, ("ok ", "NOT OK", "NOT OK"), strict=True)}) == 1
    assert rows[0].rstrip().endswith("0 of 9,830 unforced requests reached green")
    sent_end = lines[0].index("requests sent") + len("requests sent")
    failed_end = lines[0].index("failed") + len("failed")
    # numbers right-aligned under their headers; an unmeasured drill shows dashes
    assert rows[0][:sent_end].endswith(" 9,830") and rows[1][:failed_end].endswith(" 12")
    assert rows[2][:sent_end].endswith(" -") and rows[2][:failed_end].endswith(" -")


def test_the_markdown_table_escapes_pipes_and_sums_up():
    text = render_markdown(RESULTS, ["Run on a test machine."])
    lines = text.splitlines()
    assert lines[0] == "# `make chaos`" and "Run on a test machine." in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    assert lines[header + 1].startswith("|--:|---|")
    rows = lines[header + 2 : header + 5]
    assert rows[0] == (
        "| 1 | candidate SIGKILLed at 30% | 9,830 | 0 | ok | 0 of 9,830 unforced requests reached green |"
    )
    assert "12 failed \\| connection refused" in rows[1]  # a pipe would split the cell
    assert rows[2].startswith("| 3 | drill that broke | - | - | NOT OK |")
    assert "1 of 3 drills ok, 2 NOT OK" in text


def test_a_drill_error_is_one_line_naming_its_type_unless_it_is_ours():
    assert one_line(CanaryError("slot green's process is gone")) == "slot green's process is gone"
    assert one_line(ValueError("bad\n  value")) == "ValueError: bad value"
    assert one_line(TimeoutError()) == "TimeoutError: TimeoutError"
    missing = FileNotFoundError(2, "No such file or directory", "redis-server")
    assert one_line(missing) == "redis-server is not installed (make setup installs the system services)"


def write_final_json(path, entries):
    path.write_text(json.dumps(entries))
    return path


def entry(name: str, requests: int, failures: int, max_ms: float) -> dict:
    return {"name": name, "method": "POST", "num_requests": requests, "num_failures": failures,
            "max_response_time": max_ms}  # fmt: skip


def test_locust_final_json_is_summed_and_split_by_the_answering_slot(tmp_path):
    final = write_final_json(
        tmp_path / "final.json",
        [
            entry("rest-json blue v1", 700, 0, 120.5),
            entry("rest-json green v2", 300, 2, 10_050.0),
            entry("rest-json ? v?", 5, 5, 3.0),
        ],
    )
    failures = tmp_path / "run_failures.csv"
    failures.write_text(
        "Method,Name,Error,Occurrences,First Seen,Last Seen\n"
        "POST,rest-json ? v?,\"ConnectionRefusedError(111, 'Connection refused')\",5,a,b\n"
        "POST,rest-json green v2,CatchResponseError('HTTP 500'),2,a,b\n"
    )
    stats = read_locust_json(final, failures)
    assert (stats.requests, stats.failures, stats.max_ms) == (1005, 7, 10_050.0)
    assert stats.by_slot == {"blue": (700, 0), "green": (300, 2), "?": (5, 5)}
    assert stats.answered_by("green") == 300 and stats.answered_by("red") == 0
    assert stats.top_failure == "ConnectionRefusedError(111, 'Connection refused') x5"


def test_a_locust_run_without_requests_or_failures_file_reads_as_zero(tmp_path):
    stats = read_locust_json(write_final_json(tmp_path / "final.json", []), tmp_path / "missing.csv")
    assert (stats.requests, stats.failures, stats.max_ms, stats.by_slot, stats.top_failure) == (0, 0, 0.0, {}, "")


def test_top_failure_is_empty_without_failures(tmp_path):
    failures = tmp_path / "run_failures.csv"
    failures.write_text("Method,Name,Error,Occurrences,First Seen,Last Seen\n")
    assert top_failure(failures) == ""


@pytest.mark.parametrize(
    ("shares", "weight", "expected"),
    [
        ({"blue": 700, "green": 300}, 30, True),
        ({"blue": 640, "green": 360}, 30, True),  # within 8 points
        ({"blue": 600, "green": 400}, 30, False),
        ({"blue": 1000, "green": 0}, 0, True),
        ({"blue": 999, "green": 1}, 0, False),  # at 0% not one request may reach the candidate
        ({"blue": 0, "green": 500}, 100, True),
        ({"blue": 1, "green": 500}, 100, False),
        ({"blue": 0, "green": 0}, 0, False),  # nothing measured proves nothing
    ],
)
def test_the_split_matches_the_weight_exactly_at_the_ends_and_roughly_between(shares, weight, expected):
    assert split_matches(shares, "green", weight) is expected


def test_the_champion_stays_stable_and_the_newest_other_version_is_the_candidate():
    built = {1: "digits-service:v1", 2: "digits-service:v2", 3: "digits-service:v3"}
    assert pick_releases(built, champion=2) == (Release("digits-service:v2", "2"), Release("digits-service:v3", "3"))
    assert pick_releases(built, champion=3) == (Release("digits-service:v3", "3"), Release("digits-service:v2", "2"))
    # no champion, or a champion that is not built: the newest is stable
    assert pick_releases(built, champion=None) == (Release("digits-service:v3", "3"), Release("digits-service:v2", "2"))
    assert pick_releases(built, champion=7)[0] == Release("digits-service:v3", "3")  # type: ignore[index]
    assert pick_releases({1: "digits-service:v1"}, champion=1) is None
    assert pick_releases({}, champion=None) is None


def test_the_chaos_stack_has_its_own_name_and_ten_distinct_free_ports():
    settings = chaos_settings()
    ports = [getattr(settings, name) for name in PORT_FIELDS]
    assert settings.name == "chaos" and len(set(ports)) == len(PORT_FIELDS)
    assert 8080 not in ports and all(1024 < port < 65536 for port in ports)
    assert chaos_settings(upstream_timeout_s=4.0).upstream_timeout_s == 4.0


def test_a_canary_subprocess_gets_every_setting_of_the_chaos_stack(monkeypatch):
    settings = chaos_settings(force_allow=["10.0.0.0/8"])
    env = stack_env(settings)
    assert env["CANARY_STACK_NAME"] == "chaos"
    assert env["CANARY_STACK_NGINX_REST_PORT"] == str(settings.nginx_rest_port)
    assert json.loads(env["CANARY_STACK_FORCE_ALLOW"]) == ["10.0.0.0/8"]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert StackSettings() == settings  # what the subprocess reads back is this very stack
