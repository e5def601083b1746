"""The release planner's rules, without processes: what each command does to traffic."""

from __future__ import annotations

import pytest

from deploy.release import (
    plan_deploy,
    plan_finish_promote,
    plan_initial,
    plan_promote,
    plan_revert_promote,
    plan_rollback,
    plan_shadow,
    plan_switch,
    plan_weight,
)
from deploy.state import ReleaseState, StateStore
from models.errors import CanaryError


@pytest.fixture
def serving_v1() -> ReleaseState:
    return plan_initial(ReleaseState(), "digits-service:v1", "1").after


@pytest.fixture
def with_candidate(serving_v1) -> ReleaseState:
    return plan_deploy(serving_v1, "digits-service:v2", "2").after


def test_deploy_starts_the_candidate_in_the_idle_slot_at_zero(serving_v1):
    plan = plan_deploy(serving_v1, "digits-service:v2", "2")
    assert plan.start_slot == ("green", "digits-service:v2")
    assert (plan.after.candidate, plan.after.weight) == ("green", 0)
    assert plan.after.slots["blue"].bento == "digits-service:v1"


def test_weight_moves_only_the_candidate_share(with_candidate):
    plan = plan_weight(with_candidate, 25)
    assert plan.after.weight == 25 and plan.after.stable == "blue"
    assert '-  "weight": 0' in plan.diff() and '+  "weight": 25' in plan.diff()
    assert "blue=digits-service:v1 75%, green=digits-service:v2 25%" in "\n".join(plan.describe())


@pytest.mark.parametrize("weight", [-1, 101])
def test_weight_outside_0_100_is_refused(with_candidate, weight):
    with pytest.raises(CanaryError, match="between 0 and 100"):
        plan_weight(with_candidate, weight)


@pytest.mark.parametrize("plan", [lambda s: plan_weight(s, 5), plan_switch, lambda s: plan_promote(s, 60, "now"),
                                  plan_rollback, lambda s: plan_shadow(s, True)])  # fmt: skip
def test_commands_that_need_a_candidate_refuse_without_one(serving_v1, plan):
    with pytest.raises(CanaryError, match="needs a candidate"):
        plan(serving_v1)


def test_switch_keeps_the_old_stable_warm_and_switching_back_restores(with_candidate):
    switched = plan_switch(with_candidate).after
    assert (switched.stable, switched.candidate, switched.weight) == ("green", "blue", 0)
    back = plan_switch(switched).after
    assert (back.stable, back.candidate) == ("blue", "green")


def test_promote_without_bake_checks_the_candidate_stops_the_old_and_moves_champion(with_candidate):
    plan = plan_promote(plan_weight(with_candidate, 50).after, 0, "now")
    assert (plan.after.stable, plan.after.candidate, plan.after.weight) == ("green", None, 0)
    assert plan.stop_slot == "blue" and plan.champion_version == "2"
    assert plan.check_slots == ("green",)
    assert any("check slot green" in line for line in plan.describe())


def test_promote_with_bake_keeps_the_old_stable_warm_until_the_bake_passes(with_candidate):
    baking = plan_promote(plan_weight(with_candidate, 50).after, 60, "t0")
    assert baking.check_slots == ("green",) and baking.stop_slot is None and baking.champion_version is None
    state = baking.after
    assert (state.stable, state.candidate, state.weight) == ("green", "blue", 0)
    assert state.baking == {"slot": "green", "previous": "blue", "since": "t0", "bake_s": 60}
    for refused in (lambda s: plan_weight(s, 10), lambda s: plan_deploy(s, "digits-service:v3", "3"),
                    lambda s: plan_promote(s, 60, "t1")):  # fmt: skip
        with pytest.raises(CanaryError, match="still baking"):
            refused(state)
    done = plan_finish_promote(state, "120 requests")
    assert (done.after.stable, done.after.candidate, done.after.baking) == ("green", None, None)
    assert done.stop_slot == "blue" and done.champion_version == "2"
    back = plan_revert_promote(state, "error ratio 50%")
    assert (back.after.stable, back.after.candidate, back.after.weight, back.after.baking) == ("blue", "green", 0, None)
    assert back.stop_slot is None and back.champion_version is None and back.check_slots == ()
    assert "error ratio 50%" in back.after.note
    assert plan_rollback(state).after.stable == "blue"  # a rollback during the bake switches back


def test_slots_that_gain_traffic_are_checked_and_a_rollback_checks_nothing(with_candidate):
    assert plan_weight(with_candidate, 30).check_slots == ("green",)
    at_30 = plan_weight(with_candidate, 30).after
    assert plan_weight(at_30, 10).check_slots == ("blue",)  # stable gains what green loses
    assert plan_switch(at_30).check_slots == ("green",)
    assert plan_rollback(at_30).check_slots == ()


def test_rollback_sends_the_candidate_to_zero_with_the_reason(with_candidate):
    plan = plan_rollback(plan_weight(with_candidate, 50).after, reason="p95 regressed")
    assert plan.after.weight == 0 and plan.after.candidate == "green"
    assert "p95 regressed" in plan.after.note


def test_deploying_the_stable_bento_again_is_refused(serving_v1):
    with pytest.raises(CanaryError, match="already the stable"):
        plan_deploy(serving_v1, "digits-service:v1", "1")


def test_deploy_before_anything_serves_is_refused():
    with pytest.raises(CanaryError, match="canary up"):
        plan_deploy(ReleaseState(), "digits-service:v2", "2")


def test_state_round_trips_atomically_and_history_records_who_and_why(tmp_path, with_candidate):
    store = StateStore(tmp_path)
    store.save(with_candidate)
    assert store.load() == with_candidate
    store.history.append("rollback", "green to 0%", reason="errors")
    (entry,) = store.history.entries()
    assert entry["action"] == "rollback" and entry["reason"] == "errors" and entry["who"]
    assert not list(tmp_path.glob(".*.tmp"))
