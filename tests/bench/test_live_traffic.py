"""The bench's live-traffic contender: stable's answers seeded where the shadow diff looks
them up, and requests that reach the slot as shadow copies, each under its own id."""

from __future__ import annotations

import pytest

from bench.live_traffic import REQUEST_IDS, as_shadow_copies, seed_stable_answers
from bench.payloads import sample_rows, to_v2_json
from bench.processes import redis_server
from bench.wrk import lua_script
from models.data import load_split
from service.sinks import open_store

pytestmark = pytest.mark.slow


def test_seeded_stable_answers_are_what_the_shadow_diff_finds_by_id():
    rows = sample_rows(3)
    with redis_server() as url:
        seed_stable_answers(url, "digits", rows, count=12)
        store = open_store(url)
        found = store.lookup("digits", ["bench-0", "bench-11", "bench-12"])
        assert sorted(found) == ["bench-0", "bench-11"]  # exactly the seeded range
        assert found["bench-11"].classes == tuple(int(c) for c in load_split().y_test[:3])
        assert store.lookup("another-model", ["bench-0"]) == {}
        store.close()


def test_copies_carry_the_mirror_header_and_a_rotating_id_only_when_asked():
    plain = to_v2_json(sample_rows(1))
    copy = as_shadow_copies(plain)
    assert ("X-Canary-Shadow", "1") in copy.headers and copy.body == plain.body
    assert f'"bench-" .. (sent % {REQUEST_IDS})' in lua_script(paced=False, request_ids=copy.request_ids)
    static = lua_script(paced=False, request_ids=plain.request_ids)
    assert "function request()" not in static  # wrk's static request: no Lua per request


def test_the_three_servers_in_turns_never_share_a_log_file_or_metrics():
    from bench.live_traffic import MODES, in_turns_contenders

    contenders = in_turns_contenders()
    assert tuple(contenders) == MODES and len({c.name for c in contenders.values()}) == 3
    assert [(c.prediction_log, c.prediction_log and c.shadow_copies) for c in contenders.values()] == [
        (False, False),
        (True, False),
        (True, True),
    ]
