"""What each `canary` release command calls: the CLI only parses, resolves `--target` once,
calls one method of that `ReleaseTarget` and prints. Pinned against a fake target, in-process
with Typer's CliRunner (the end-to-end runs are in tests/deploy/test_stack.py and test_rollout.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import deploy.targets
from deploy.cli import app, main
from deploy.targets.base import Applied, GateRequest, Unsupported


class FakeTarget:
    """Records every call; answers like a target would."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _record(self, method: str, *args: Any) -> Applied:
        self.calls.append((method, args))
        return Applied([f"{method} done"], 1 if method == "gate" else 0)

    def up(self, say):
        self.calls.append(("up", ()))
        return ["stack up"]

    def down(self):
        self.calls.append(("down", ()))
        return ["nginx", "slot-blue"]

    def deploy(self, release, dry_run):
        return self._record("deploy", release, dry_run)

    def weight(self, percent, dry_run):
        return self._record("weight", percent, dry_run)

    def switch(self, dry_run):
        return self._record("switch", dry_run)

    def promote(self, dry_run, bake, say):
        return self._record("promote", dry_run, bake)

    def rollback(self, reason, dry_run):
        return self._record("rollback", reason, dry_run)

    def shadow(self, on, dry_run):
        return self._record("shadow", on, dry_run)

    def status(self):
        self.calls.append(("status", ()))
        return {"stable": "blue"}

    def format_status(self, status):
        return f"stable is {status['stable']}"

    def history(self):
        self.calls.append(("history", ()))
        return [{"time": "t", "who": "ada", "action": "weight", "detail": "30%", "reason": "why"}]

    def gate(self, request, say):
        return self._record("gate", request)

    def rollout(self, steps, request, bake, say):
        return self._record("rollout", steps, request, bake)


@pytest.fixture
def fakes(monkeypatch) -> dict[str, FakeTarget]:
    made = {name: FakeTarget(name) for name in ("local", "compose", "k8s")}
    monkeypatch.setattr(deploy.targets, "TARGETS", {name: (lambda home, n=name: made[n]) for name in made})
    return made


CASES = [
    (["up"], ("up", ()), "stack up"),
    (["down"], ("down", ()), "stopped: nginx, slot-blue"),
    (["deploy", "3"], ("deploy", ("3", False)), "deploy done"),
    (["deploy", "@challenger", "--dry-run"], ("deploy", ("@challenger", True)), "deploy done"),
    (["weight", "30"], ("weight", (30, False)), "weight done"),
    (["switch", "--dry-run"], ("switch", (True,)), "switch done"),
    (["promote"], ("promote", (False, None)), "promote done"),
    (["promote", "--bake", "2m"], ("promote", (False, "2m")), "promote done"),
    (["rollback", "--reason", "p95 up"], ("rollback", ("p95 up", False)), "rollback done"),
    (["shadow", "on"], ("shadow", (True, False)), "shadow done"),
    (["status"], ("status", ()), "stable is blue"),
    (["history"], ("history", ()), "ada        weight    30%  (why)"),
    (
        ["rollout", "--steps", "10,50", "--step-duration", "20s", "--bake", "0"],
        ("rollout", ([10, 50], GateRequest(20.0, 16, 16.0), "0")),
        "rollout done",
    ),  # fmt: skip
    (
        ["rollout", "--steps", "50", "--thresholds", "loadtest/thresholds.yaml"],
        ("rollout", ([50], GateRequest(30.0, 16, 16.0, Path("loadtest/thresholds.yaml")), None)),
        "rollout done",
    ),  # fmt: skip
]


@pytest.mark.parametrize("target", ["local", "compose", "k8s"])
@pytest.mark.parametrize(("args", "call", "printed"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_each_command_makes_one_call_on_the_chosen_target(fakes, target, args, call, printed):
    result = CliRunner().invoke(app, ["--target", target, *args])
    assert result.exit_code == 0, result.output
    assert fakes[target].calls == [call]
    assert all(not fake.calls for name, fake in fakes.items() if name != target)
    assert printed in result.output


def test_a_commands_exit_code_reaches_the_shell(fakes):
    result = CliRunner().invoke(app, ["gate", "--duration", "10s", "--users", "4"])
    assert result.exit_code == 1 and fakes["local"].calls == [("gate", (GateRequest(10.0, 4, 16.0),))]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gate", "--duration", "soon"], "duration 'soon' must look like 30s or 2m"),
        (["rollout", "--steps", "5,x"], "must be comma-separated percentages"),
        (["shadow", "maybe"], "shadow takes on or off"),
        (["gate", "--thresholds", "no-such.yaml"], "--thresholds no-such.yaml: "),
        (["rollout", "--thresholds", "pyproject.toml"], "--thresholds pyproject.toml: "),
        (["--target", "mars", "status"], "--target must be local, compose or k8s"),
    ],
)
def test_bad_options_are_one_line_and_call_nothing(fakes, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.count("\n") == 1 and message in err
    assert all(not fake.calls for fake in fakes.values())


def test_a_refusing_target_is_one_line_and_exit_1(fakes, capsys, monkeypatch):
    def refuse(request, say):
        raise Unsupported("k8s", "gate", "not yet")

    monkeypatch.setattr(fakes["k8s"], "gate", refuse)
    with pytest.raises(SystemExit) as exited:
        main(["--target", "k8s", "gate"])
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: `canary gate` is not available on --target k8s: not yet\n"


def test_status_watch_redraws_the_targets_status(fakes, monkeypatch):
    from deploy.watch import render, watch_status

    watch_status(fakes["k8s"], interval_s=0.01, frames=3)
    assert fakes["k8s"].calls == [("status", ())] * 4  # the first frame, then 3 redraws
    frame = render(fakes["local"], now=lambda: "12:00:00")
    assert frame.startswith("canary status --target local   12:00:00") and frame.endswith("stable is blue")

    def unreachable():
        raise Unsupported("k8s", "status", "cluster gone")

    monkeypatch.setattr(fakes["k8s"], "status", unreachable)
    assert "status unavailable: `canary status` is not available" in render(fakes["k8s"])


# -- the pipeline commands: each calls one function of models/ or deploy/ --------------------


class Recorder:
    """Stands in for one pipeline function; records its arguments, returns `result`."""

    def __init__(self, result=None) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, {k: v for k, v in kwargs.items() if k != "say"}))
        return self.result


def test_train_calls_train_and_register_with_the_config(monkeypatch):
    from types import SimpleNamespace

    import models.pipeline
    from models.train import TrainConfig

    ref = SimpleNamespace(label="digits/7", aliases=("challenger",))
    fake = Recorder(SimpleNamespace(ref=ref, test_accuracy=0.9512))
    monkeypatch.setattr(models.pipeline, "train_and_register", fake)
    result = CliRunner().invoke(app, ["train", "--model", "digits-linear", "--epochs", "4", "--seed", "2"])
    assert result.exit_code == 0, result.output
    (((_home, config, _say), _),) = fake.calls
    assert config == TrainConfig(model="digits-linear", epochs=4, seed=2)
    assert "digits/7 test_accuracy=0.9512 aliases=challenger" in result.output


def test_export_build_and_containerize_call_their_one_function(monkeypatch):
    from types import SimpleNamespace

    import deploy.containerize
    import models.bento
    import models.pipeline

    export = Recorder(SimpleNamespace(stored=SimpleNamespace(tag="digits:v3"), sha256="ab" * 32))
    build = Recorder(SimpleNamespace(tag="digits-service:v3", archive="bentos/x.bento", archive_bytes=10))
    monkeypatch.setattr(models.pipeline, "export_version", export)
    monkeypatch.setattr(models.bento, "build_bento", build)
    monkeypatch.setattr(models.bento, "find_bento", Recorder(("digits-service:v3", "3")))
    built = deploy.containerize.ImageReport("digits-service:v3", "bento-canary-base:bookworm", 312.0, ())
    image = Recorder(built)
    monkeypatch.setattr(deploy.containerize, "containerize", image)
    runner = CliRunner()
    assert runner.invoke(app, ["export", "--alias", "challenger", "--quantize", "int8"]).exit_code == 0
    assert export.calls[0][0][1:] == (None, "challenger") and export.calls[0][1] == {"quantize": "int8"}
    assert runner.invoke(app, ["build", "--version", "3"]).exit_code == 0
    assert build.calls[0][0][1:] == (3, None)
    out = runner.invoke(app, ["containerize", "3"])
    assert out.exit_code == 0 and image.calls[0][0][1] == "digits-service:v3"
    assert "digits-service:v3: 312 MB (within the 400 MB target), base bento-canary-base:bookworm" in out.output


def test_demo_and_serve_delegate(monkeypatch):
    import os

    import deploy.demo

    demo = Recorder()
    monkeypatch.setattr(deploy.demo, "run_demo", demo)
    assert CliRunner().invoke(app, ["demo", "--epochs", "2"]).exit_code == 0
    assert demo.calls[0][0][1] == 2
    became = Recorder()
    monkeypatch.setattr(os, "execv", became)
    monkeypatch.setattr("models.home.CanaryHome.require", lambda self: None)
    monkeypatch.setenv("CANARY_SERVICE_REST_PORT", "8100")  # (restored after the test)
    monkeypatch.setenv("CANARY_SERVICE_GRPC_PORT", "0")
    result = CliRunner().invoke(app, ["serve", "digits-service:v1", "--port", "3100", "--rest-port", "0"])
    assert result.exit_code == 0, result.output
    (((binary, argv), _),) = became.calls
    assert argv[1:] == ["serve", "digits-service:v1", "--host", "127.0.0.1", "--port", "3100"]
    assert os.environ["CANARY_SERVICE_REST_PORT"] == "0"  # the flag wins
    assert os.environ["CANARY_SERVICE_GRPC_PORT"] == "0"  # no flag: the environment's setting stays
