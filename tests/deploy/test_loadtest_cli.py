"""`canary loadtest` refuses bad input in one line (exit code 1) before starting anything, and
plans the Locust processes it would start. The real runs against a real stack are in
tests/deploy/test_stack.py."""

from __future__ import annotations

import pytest

from deploy.cli import main
from deploy.loadtest import LOCUSTFILE, LoadOptions, plan_load
from deploy.process import free_port
from deploy.release import plan_deploy, plan_initial
from deploy.stack import LocalStack, StackSettings
from deploy.state import ReleaseState
from loadtest.targets import FORCE_TOKEN_ENV
from models.errors import CanaryError
from models.home import CanaryHome


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["loadtest", *args])
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--slot", "purple"), "--slot must be blue or green, got 'purple'"),
        (("--shape", "zigzag"), "--shape must be one of step, spike, soak, knee, got 'zigzag'"),
        (("--workers", "-1"), "--workers must be between 0 and 64"),
        (("--duration", "soon"), "duration"),
    ],
)
def test_bad_options_are_one_line_and_exit_1(capsys, args, message):
    code, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_a_stack_that_is_not_up_is_one_line_and_exit_1(capsys, monkeypatch, tmp_path):
    for name in ("CANARY_HOME", "BENTOML_HOME", "MLFLOW_TRACKING_URI"):  # restored after the test
        monkeypatch.setenv(name, str(tmp_path / "home"))
    monkeypatch.setenv("CANARY_STACK_NAME", "never-started")
    code, err = run_cli(capsys, "--headless")
    assert (code, err.strip()) == (1, "error: the stack is not running: run `canary up` first")


class RunningNginx:
    def running(self) -> bool:
        return True


def stack_with_candidate(tmp_path, monkeypatch) -> LocalStack:
    """A stack whose state says blue serves v1 (stable) and green v2 (candidate); nginx
    reports itself running, nothing else is started."""
    settings = StackSettings(name="plan", nginx_rest_port=free_port(), nginx_grpc_port=free_port())
    stack = LocalStack(CanaryHome(home=tmp_path), settings)
    monkeypatch.setattr(LocalStack, "nginx", lambda self: RunningNginx())
    state = plan_initial(stack.store.load(), "digits-service:v1", "1").after
    stack.store.save(plan_deploy(state, "digits-service:v2", "2").after)
    return stack


def test_one_slot_is_loaded_forced_through_nginx_with_the_token_off_the_command_line(tmp_path, monkeypatch):
    stack = stack_with_candidate(tmp_path, monkeypatch)
    s = stack.settings
    plan = plan_load(stack, LoadOptions(slot="green", headless=True, duration_s=20), stamp="run")
    command = plan.command
    assert command[command.index("-f") + 1] == str(LOCUSTFILE)
    assert command[command.index("--host") + 1] == f"http://127.0.0.1:{s.nginx_rest_port}"
    assert command[command.index("--grpc-host") + 1] == f"127.0.0.1:{s.nginx_grpc_port}"
    assert [command[command.index(o) + 1] for o in ("--force", "--expect-slot", "--expect-version")] == [
        "always", "green", "2",
    ]  # fmt: skip
    assert command[command.index("-t") + 1] == "20s" and command[command.index("--csv") + 1].endswith("run/locust")
    token = stack.force_token()
    assert plan.env[FORCE_TOKEN_ENV] == token and token not in " ".join(command) and token not in repr(plan)
    assert plan.report_dir == tmp_path / "loadtest" / "run" and plan.workers == []
    stable = plan_load(stack, LoadOptions(slot="blue", headless=True), stamp="run").command
    assert stable[stable.index("--force") + 1] == "never"


def test_workers_get_a_master_on_loopback_and_a_shape_replaces_the_run_time(tmp_path, monkeypatch):
    stack = stack_with_candidate(tmp_path, monkeypatch)
    plan = plan_load(stack, LoadOptions(workers=3, shape="knee", headless=True), stamp="run")
    port = plan.command[plan.command.index("--master-bind-port") + 1]
    assert "--master" in plan.command and plan.command[plan.command.index("--expect-workers") + 1] == "3"
    assert plan.command[plan.command.index("--master-bind-host") + 1] == "127.0.0.1"
    assert len(plan.workers) == 3 and all(
        w[-4:] == ["--master-host", "127.0.0.1", "--master-port", port] for w in plan.workers
    )
    assert "-t" not in plan.command and plan.env["CANARY_SHAPE"] == "knee"
    # a headless master would quit before its workers' last statistics arrive: it autostarts,
    # stops them, waits longer than their report interval (3 s), then quits
    assert "--headless" not in plan.command and "--autostart" in plan.command
    assert float(plan.command[plan.command.index("--autoquit") + 1]) > 3
    assert plan.command[plan.command.index("--knee-out") + 1] == str(plan.report_dir / "knee.json")
    web = plan_load(stack, LoadOptions(web_port=free_port()), stamp="web")
    assert web.web_url and "--headless" not in web.command and "--csv" not in web.command


def test_a_slot_that_serves_nothing_is_refused(tmp_path, monkeypatch):
    stack = stack_with_candidate(tmp_path, monkeypatch)
    stack.store.save(plan_initial(ReleaseState(), "digits-service:v1", "1").after)  # blue only
    with pytest.raises(CanaryError, match="slot green serves no traffic"):
        plan_load(stack, LoadOptions(slot="green"))


def test_a_headless_run_ends_with_a_summary_per_request_name():
    from deploy.loadtest import summary_lines

    def entry(name: str, requests: int, failures: int, times: dict[str, int]) -> dict:
        return {"name": name, "num_requests": requests, "num_failures": failures, "start_time": 100.0,
                "last_request_timestamp": 110.0, "response_times": times}  # fmt: skip

    lines = summary_lines([entry("rest-json green v2", 100, 1, {"10": 99, "300": 1}),
                           entry("grpc blue v1", 50, 0, {"20": 50})])  # fmt: skip
    assert lines[1].split() == ["grpc", "blue", "v1", "50", "0", "5.0", "20", "20", "20"]
    assert lines[2].split() == ["rest-json", "green", "v2", "100", "1", "10.0", "10", "10", "10"]
    assert lines[3].split() == ["all", "150", "1", "15.0", "10", "20", "20"]
    assert summary_lines([]) == ["no requests"]
