"""Real Locust runs of the load-test locustfile against a real stack: through Locust's own
CLI and through `canary loadtest`, with the statistics they wrote read back from CSV."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE

from deploy.chaos import stack_env
from deploy.loadtest import LOCUSTFILE
from deploy.stack import LocalStack
from models.home import REPO_ROOT
from tests.support.canary_cli import CANARY

TIMEOUT_S = 180


def stats_rows(stats_csv: Path) -> dict[str, dict[str, str]]:
    """Locust's `<prefix>_stats.csv` by request name (the last row, "Aggregated", included)."""
    with open(stats_csv, newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def locust_cli(stack: LocalStack, out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`locust -f loadtest/locustfile.py --host <nginx> <args> --csv <out>/run`, with the
    stack's gRPC port in the environment as `canary up` was given it."""
    host = f"http://127.0.0.1:{stack.settings.nginx_rest_port}"
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args, "--host", host, "--csv", str(out / "run")]
    env = {**os.environ, "CANARY_STACK_NGINX_GRPC_PORT": str(stack.settings.nginx_grpc_port)}
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return done, stats_rows(out / "run_stats.csv")


@dataclass(frozen=True)
class LoadtestRun:
    done: subprocess.CompletedProcess
    report_dir: Path
    rows: dict[str, dict[str, str]]

    @property
    def total(self) -> dict[str, str]:
        return self.rows["Aggregated"]

    def rate(self) -> float:
        """Requests per second while the load ran: from the first request to the last (the
        final `stats.json`), so a worker's start-up on a busy machine does not count."""
        entries = json.loads((self.report_dir / "stats.json").read_text())
        started = min(e["start_time"] for e in entries)
        ended = max(e["last_request_timestamp"] for e in entries)
        return sum(e["num_requests"] for e in entries) / (ended - started)


def canary_loadtests(stack: LocalStack, *runs: tuple[str, ...]) -> list[LoadtestRun]:
    """`canary loadtest --headless <args>` on this stack once per `runs` entry, all at the same
    time (they share whatever else the machine is doing), and what each wrote."""
    env = {**os.environ, **stack_env(stack.settings)}
    argvs = [[CANARY, "loadtest", "--headless", *args] for args in runs]
    processes = [subprocess.Popen(argv, stdout=PIPE, stderr=PIPE, text=True, env=env) for argv in argvs]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        reports = [line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith("reports: ")]
        assert reports, stdout[-2000:] + stderr[-3000:]
        report_dir = Path(reports[-1])
        results.append(LoadtestRun(done, report_dir, stats_rows(report_dir / "locust_stats.csv")))
    return results
