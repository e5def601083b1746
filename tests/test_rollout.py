"""`canary rollout` on the real stack: a broken candidate is rolled back by the gate without
anyone watching; a healthy twin walks every step and is promoted (alias champion moves)."""

from __future__ import annotations

import pytest

from deploy.process import free_port
from deploy.release import plan_deploy
from deploy.rollout import GateOptions, rollout
from deploy.stack import LocalStack, StackSettings
from models.registry import CHAMPION, Registry

pytestmark = pytest.mark.slow
QUICK = GateOptions(duration_s=10, users=16, spawn_rate=16)  # >= 400 samples per slot


@pytest.fixture(scope="module")
def stack(canary_home, built_pipeline):
    names = ["nginx_rest_port", "nginx_grpc_port", "nginx_admin_port", "blue_rest_port", "blue_grpc_port",
             "green_rest_port", "green_grpc_port", "blue_v2_port", "green_v2_port", "redis_port"]  # fmt: skip
    stack = LocalStack(canary_home, StackSettings(name="stack-rollout-test", **{name: free_port() for name in names}))
    stack.up((built_pipeline.bento_tag, str(built_pipeline.version)))
    yield stack
    stack.down()


@pytest.fixture(scope="module")
def twin(canary_home):
    """A genuinely separate release of the same model: same seed and epochs, so the same weights."""
    from models.bento import build_bento
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig
    from tests.support.pipeline import EPOCHS

    trained = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=EPOCHS, seed=0))
    export_version(canary_home, version=trained.ref.version)
    return build_bento(canary_home, version=trained.ref.version).tag, str(trained.ref.version)


def test_a_failing_candidate_is_rolled_back_by_the_gate(stack, twin, monkeypatch, canary_home):
    monkeypatch.setenv("CANARY_SERVICE_FAULT_ERROR_RATIO", "0.2")  # read by the slot at start only
    stack.execute(plan_deploy(stack.store.load(), *twin))
    monkeypatch.delenv("CANARY_SERVICE_FAULT_ERROR_RATIO")
    lines: list[str] = []
    code = rollout(stack, [10, 100], QUICK, lines.append, on_champion=lambda v: pytest.fail("must not promote"))
    state = stack.store.load()
    assert code == 1
    assert state.weight == 0 and state.candidate is not None
    assert state.last_gate["verdict"] == "fail"
    last = stack.store.history.entries()[-1]
    assert last["action"] == "rollback" and "gate fail at 10%" in last["reason"]
    tags = Registry(canary_home).get(int(twin[1])).tags
    assert tags["gate.verdict"] == "fail"


def test_a_healthy_twin_walks_every_step_and_is_promoted(stack, twin, canary_home):
    stack.execute(plan_deploy(stack.store.load(), *twin))  # redeploy: a fresh process, no faults
    moved: list[str] = []

    def move(version: str) -> None:
        moved.append(version)
        Registry(canary_home).set_alias(CHAMPION, int(version))

    lines: list[str] = []
    code = rollout(stack, [50, 100], QUICK, lines.append, on_champion=move)
    assert code == 0, "\n".join(lines)
    state = stack.store.load()
    assert state.candidate is None and state.slots[state.stable].bento == twin[0]
    assert moved == [twin[1]]
    assert "champion" in Registry(canary_home).get(int(twin[1])).aliases
    assert [e["action"] for e in stack.store.history.entries()[-5:]].count("gate") == 2
