"""`python -m bench.knee` (`make knee`): Locust's knee-finding shape against the path `make
bench` saturates, and the two capacities side by side.

The path is the project's Bento behind its nginx (`bench.contenders.NginxFrontedBento`, as
`make bench` serves it), V2 REST JSON, one digit per request, from the bench's own state
folder (`make bench` trains and builds the models there; this reuses them). The default
model is digits-heavy: there the model is the limit (a few hundred requests/s on 2 cores),
while digits-cnn serves thousands per second, more than a Python load generator sharing
those cores can send, so a knee found there would measure Locust rather than the server.

Locust runs `loadtest/locustfile.py`'s V2RestJsonUser alone, flat out (`--user-rate 0`),
with CANARY_SHAPE=knee: users rise step by step until a step's p99 or failure ratio crosses
its limit; the capacity is the best requests/s of a step within the limits. That figure is
compared with the bench report's saturated requests/s for the same model, contender
(bento-nginx) and protocol (rest-json), when the report has it.

Exit codes: 0 the knee was found (whatever the comparison says), 2 it could not be.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.config import ARCHITECTURES, DEFAULT_HOME

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO_ROOT / "loadtest" / "locustfile.py"
WITHIN = 0.30  # the bar: the knee's capacity within 30% of the saturated figure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.knee", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"the bench's state folder ({DEFAULT_HOME})")
    parser.add_argument("--model", choices=ARCHITECTURES, default="digits-heavy", help="default digits-heavy")
    parser.add_argument("--report", type=Path, help="bench report.json to compare with (default <home>/report)")
    parser.add_argument("--out", type=Path, help="folder for Locust's reports and knee.json (default <home>/knee)")
    parser.add_argument("--start-users", type=int, default=4)
    parser.add_argument("--step-users", type=int, default=4)
    parser.add_argument("--step-s", type=float, default=15.0, help="seconds per step (default 15)")
    parser.add_argument("--max-users", type=int, default=96)
    parser.add_argument("--p99-ms", type=float, default=150.0, help="p99 limit of a step (default 150 ms)")
    parser.add_argument("--fail-ratio", type=float, default=0.01, help="failure ratio limit of a step (default 0.01)")
    return parser.parse_args(argv)


def saturated_rps(report: Path, model: str) -> float | None:
    """`make bench`'s saturated req/s of bento-nginx rest-json for `model`, if it measured it."""
    if not report.is_file():
        return None
    for m in json.loads(report.read_text()).get("measurements", []):
        if (m["model"], m["contender"], m["protocol"], m["mode"]) == (model, "bento-nginx", "rest-json", "saturated"):
            return float(m["rps"])
    return None


def locust_argv(host: str, args: argparse.Namespace, out: Path) -> list[str]:
    knobs = {"start-users": args.start_users, "step-users": args.step_users, "step-s": args.step_s,
             "max-users": args.max_users, "p99-ms": args.p99_ms, "fail-ratio": args.fail_ratio}  # fmt: skip
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--host", host]
    argv += ["--weights", "rest-json=1", "--user-rate", "0", "--knee-out", str(out / "knee.json")]
    argv += [item for knob, value in knobs.items() for item in (f"--knee-{knob}", str(value))]
    return [*argv, "--csv", str(out / "locust"), "--html", str(out / "report.html"), "V2RestJsonUser"]


def compare(knee: dict[str, Any], bench_rps: float | None) -> dict[str, Any]:
    capacity = knee.get("capacity_rps")
    ratio = capacity / bench_rps if capacity and bench_rps else None
    return {"knee_rps": capacity, "bench_saturated_rps": bench_rps, "ratio": ratio,
            "within_30_percent": None if ratio is None else abs(ratio - 1) <= WITHIN}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.prepare import BenchHome

    home = BenchHome(home=args.home.resolve())
    home.activate()  # before bentoml / mlflow are imported below
    os.environ["CANARY_HOME"] = str(home.home)
    for key in [k for k in os.environ if k.startswith("CANARY_SERVICE_")]:
        del os.environ[key]  # the server runs with the service's defaults, as in `make bench`
    home.create()
    out = (args.out or home.home / "knee").resolve()
    out.mkdir(parents=True, exist_ok=True)
    from bench.config import BenchConfig
    from bench.contenders import NginxFrontedBento, ServeContext
    from bench.payloads import sample_rows
    from bench.prepare import prepare_model

    config = BenchConfig(home=home.home)
    say = print
    model = prepare_model(home, args.model, config.epochs.get(args.model, 1), False, lambda m: say(f"  {m}"),
                          learning_rate=config.learning_rates.get(args.model))  # fmt: skip
    ctx = ServeContext(config.workers, home.logs, sample_rows(1), home.bentoml_home)
    (out / "knee.json").unlink(missing_ok=True)
    with NginxFrontedBento().serve(model, ctx) as served:
        host = served.endpoints[0].target.split("/v2/", 1)[0]
        say(f"knee: {args.model} behind nginx at {host}, V2 REST JSON, Locust flat out (log {out / 'locust.log'})")
        with open(out / "locust.log", "w") as log:
            env = {**os.environ, "CANARY_SHAPE": "knee"}
            subprocess.run(locust_argv(host, args, out), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if not (out / "knee.json").is_file():
        say(f"error: Locust wrote no knee result; see {out / 'locust.log'}")
        return 2
    knee = json.loads((out / "knee.json").read_text())
    result = compare(knee, saturated_rps(args.report or home.home / "report" / "report.json", args.model))
    (out / "knee-vs-bench.json").write_text(json.dumps({**result, "model": args.model, "knee": knee}, indent=2))
    for step in knee["steps"]:
        p99 = f"{step['p99_ms']:.0f}" if step["p99_ms"] is not None else "-"
        say(f"  {step['users']:>4} users  {step['rps']:8.1f} req/s  p99 {p99:>5} ms  "
            f"failures {step['fail_ratio']:.2%}  {'ok' if step['within'] else step['why']}")  # fmt: skip
    say(f"knee capacity: {result['knee_rps'] or 0:.0f} req/s ({knee['reason']})")
    if result["bench_saturated_rps"] is None:
        say("make bench's saturated figure: none in the bench report (run make bench first)")
    else:
        verdict = "within" if result["within_30_percent"] else "NOT within"
        say(f"make bench saturated (bento-nginx rest-json, {args.model}): {result['bench_saturated_rps']:.0f} req/s; "
            f"knee / bench = {result['ratio']:.2f} ({verdict} 30%)")  # fmt: skip
    say(f"result: {out / 'knee-vs-bench.json'}")
    return 0 if knee.get("capacity_rps") else 2


if __name__ == "__main__":
    sys.exit(main())
