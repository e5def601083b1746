"""`canary rollout`, `canary gate` and `canary promote` on the real stack: a broken candidate
is rolled back by the gate without anyone watching; a healthy twin walks every step, bakes and
is promoted (alias champion moves); a candidate that breaks after promote is switched back by
the bake; a candidate killed or frozen mid-gate never passes."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest

from deploy.process import free_port, kill_tree
from deploy.release import plan_deploy
from deploy.rollout import GateOptions, promote, rollout, run_gate_on_stack
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
    # read by the slot at start only; errors start after the deploy's smoke inference and the
    # first step's check, then exactly every fifth request fails (a counted schedule)
    monkeypatch.setenv("CANARY_SERVICE_FAULT_ERROR_RATIO", "0.2")
    monkeypatch.setenv("CANARY_SERVICE_FAULT_AFTER_REQUESTS", "2")
    stack.execute(plan_deploy(stack.store.load(), *twin))
    monkeypatch.delenv("CANARY_SERVICE_FAULT_ERROR_RATIO")
    monkeypatch.delenv("CANARY_SERVICE_FAULT_AFTER_REQUESTS")
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
    code = rollout(stack, [50, 100], QUICK, lines.append, on_champion=move, bake_s=3)
    assert code == 0, "\n".join(lines)
    assert any(line.startswith("bake passed") for line in lines), lines
    state = stack.store.load()
    assert state.candidate is None and state.slots[state.stable].bento == twin[0]
    assert moved == [twin[1]]
    assert "champion" in Registry(canary_home).get(int(twin[1])).aliases
    assert [e["action"] for e in stack.store.history.entries()[-5:]].count("gate") == 2


def test_a_candidate_that_breaks_after_promote_is_switched_back_by_the_bake(stack, twin, built_pipeline, monkeypatch):
    """Errors start after the deploy's smoke inference and promote's check: the new stable
    fails 1 request in 2 on live traffic, and the bake gives the old stable (still warm)
    all traffic back by itself."""
    before = stack.store.load()
    first = (built_pipeline.bento_tag, str(built_pipeline.version))
    release = twin if before.slots[before.stable].bento != twin[0] else first  # not the one serving
    monkeypatch.setenv("CANARY_SERVICE_FAULT_ERROR_RATIO", "0.5")
    monkeypatch.setenv("CANARY_SERVICE_FAULT_AFTER_REQUESTS", "2")
    deployed = stack.execute(plan_deploy(before, *release))
    monkeypatch.delenv("CANARY_SERVICE_FAULT_ERROR_RATIO")
    monkeypatch.delenv("CANARY_SERVICE_FAULT_AFTER_REQUESTS")
    old, new = deployed.stable, deployed.candidate
    url = f"http://127.0.0.1:{stack.settings.nginx_rest_port}/v2/models/digits/infer"
    stop = threading.Event()
    seen: list[tuple[int, str]] = []

    def traffic() -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                row = rng.uniform(0, 16, 64).tolist()
                body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}],
                        "parameters": {"cache": False}}  # fmt: skip
                answer = client.post(url, json=body)
                seen.append((answer.status_code, answer.headers.get("x-canary-slot", "?")))

    thread = threading.Thread(target=traffic)
    thread.start()
    lines: list[str] = []
    try:
        code = promote(stack, 60, lines.append, on_champion=lambda v: pytest.fail("must not move the champion"))
    finally:
        stop.set()
        thread.join(30)
    assert code == 1, lines
    state = stack.store.load()
    assert (state.stable, state.candidate, state.weight, state.baking) == (old, new, 0, None)
    assert "error ratio" in state.note and stack.process(f"slot-{old}").alive
    last = stack.store.history.entries()[-1]
    assert last["action"] == "revert" and "bake of slot" in last["reason"]
    assert (500, new) in seen, "the fault never showed to clients: the bake judged nothing"
    after = [httpx.post(url, json={"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                               "data": [1.0] * 64}]}, timeout=10) for _ in range(10)]  # fmt: skip
    assert {(a.status_code, a.headers["x-canary-slot"]) for a in after} == {(200, old)}


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_candidate_that_dies_or_hangs_mid_gate_never_passes(stack, twin, built_pipeline, fault):
    state = stack.store.load()
    first = (built_pipeline.bento_tag, str(built_pipeline.version))
    release = twin if state.slots[state.stable].bento != twin[0] else first
    deployed = stack.execute(plan_deploy(state, *release))
    pid = stack.process(f"slot-{deployed.candidate}").pid
    options = GateOptions(duration_s=12, users=16, spawn_rate=16)
    token = stack.token_file.read_text().strip()
    served = lambda: stack.nginx().status(token)["slots"][deployed.candidate]["requests"]  # noqa: E731
    before = served()

    def fault_mid_gate() -> None:
        # after the gate's load has reached the candidate (a fixed delay raced a slow start-up
        # on a busy machine: the candidate froze before the gate's probe), then 3 s more
        deadline = time.monotonic() + 60
        while served() < before + 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        kill_tree(pid, fault)  # the whole process tree

    timer = threading.Thread(target=fault_mid_gate)
    timer.start()
    started = time.monotonic()
    try:
        outcome = run_gate_on_stack(stack, options, label=f"chaos-{fault.name}")
    finally:
        timer.join()
        kill_tree(pid, signal.SIGCONT)
    assert outcome.exit_code != 0, outcome.verdict.summary if outcome.verdict else outcome.error
    assert outcome.verdict is not None and outcome.verdict.verdict in ("fail", "inconclusive")
    # the gate's time bound: its duration, the request timeout and start-up/report overhead
    assert time.monotonic() - started < options.duration_s + 10 + 60
    assert stack.store.load().last_gate["verdict"] == outcome.verdict.verdict
