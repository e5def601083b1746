"""`make chaos`: fault drills on a local stack of its own, under Locust load.

`python -m deploy.chaos` makes sure two model versions are built (reusing what the state
folder has, else training, exporting and building two quick digits-cnn versions), starts
a stack named "chaos" on free ports, runs the drills of `deploy.chaos_drills` (a candidate
SIGKILLed or SIGSTOPped mid-gate and at 30%, stable overloaded at 0%, Redis and nginx
restarted, `canary rollout` SIGKILLed mid-gate, promote of a dead candidate) and prints one
table: fault, requests sent, failed, what a user would notice, verdict. The table is also
written as Markdown to the state folder. The stack is stopped at the end, also on Ctrl-C
or failure. Exit code 0 when every drill is ok, 1 otherwise (or on a bad environment).

This module holds the parts that need no running stack (results, tables, Locust's
statistics, versions, settings) and `main`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.process import free_port
from deploy.stack import StackSettings
from loadtest.targets import answering_slot
from models.errors import CanaryError
from models.home import CanaryHome

Say = Callable[[str], None]
STACK_NAME = "chaos"
PORT_FIELDS = ("nginx_rest_port", "nginx_grpc_port", "nginx_admin_port", "blue_rest_port", "blue_grpc_port",
               "green_rest_port", "green_grpc_port", "blue_v2_port", "green_v2_port", "redis_port")  # fmt: skip
TRAIN_EPOCHS = 3  # a few seconds; the drills need two releases, not a good model


@dataclass(frozen=True)
class DrillResult:
    """One row of the table. `sent`/`failed` are client requests (None: not measured)."""

    fault: str
    sent: int | None
    failed: int | None
    outcome: str
    ok: bool
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "NOT OK"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def exit_code(results: Sequence[DrillResult]) -> int:
    """0 when every drill ran and is ok, 1 otherwise (no drill at all is not ok)."""
    return 0 if results and all(r.ok for r in results) else 1


def one_line(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename and "/" not in str(exc.filename):
        return f"{exc.filename} is not installed (make setup installs the system services)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, CanaryError) else f"{type(exc).__name__}: {text}"


HEADERS = ("#", "fault", "requests sent", "failed", "verdict", "outcome")


def _rows(results: Sequence[DrillResult]) -> list[tuple[str, ...]]:
    return [(str(i), r.fault, count(r.sent), count(r.failed), r.verdict, r.outcome) for i, r in enumerate(results, 1)]


def render_text(results: Sequence[DrillResult]) -> str:
    """The table for the terminal: aligned columns, numbers right-aligned, outcome last."""
    rows = [HEADERS, *_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS) - 1)]
    right = {0, 2, 3}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
        if n == 0:
            lines.append("  ".join(["-" * w for w in widths] + ["-" * len("outcome")]))
    return "\n".join(lines)


def _md(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: Sequence[DrillResult], meta: Sequence[str] = ()) -> str:
    """The table as Markdown (for the README), after `meta` lines (how it was run)."""
    head = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join(["--:", "---", "--:", "--:", "---", "---"]) + "|"]
    body = ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in _rows(results)]
    ok = sum(r.ok for r in results)
    summary = f"{ok} of {len(results)} drills ok" + ("" if ok == len(results) else f", {len(results) - ok} NOT OK")
    return "\n".join(["# `make chaos`", "", *meta, "", *head, *body, "", summary, ""])


# -- Locust's statistics ---------------------------------------------------------------------
@dataclass(frozen=True)
class LoadStats:
    """What Locust counted: totals, the slowest request, and requests/failures per answering
    slot (the locustfile names each request "<protocol> <X-Canary-Slot> v<version>"; "?" is an answer
    without the header: nginx itself did not answer)."""

    requests: int
    failures: int
    max_ms: float
    by_slot: dict[str, tuple[int, int]] = field(default_factory=dict)
    top_failure: str = ""

    def answered_by(self, slot: str) -> int:
        return self.by_slot.get(slot, (0, 0))[0]


def read_locust_json(final_json: Path, failures_csv: Path | None = None) -> LoadStats:
    """Locust's `--json-file` (written once, at shutdown, with the final counts: its
    `--csv` files are rewritten every second and not again on SIGTERM, so they miss up to
    the last second of the run). Per-request entries; there is no aggregate row."""
    entries = json.loads(final_json.read_text())
    by_slot: dict[str, tuple[int, int]] = {}
    for entry in entries:
        name = str(entry["name"])
        slot = answering_slot(name)
        requests, failures = by_slot.get(slot, (0, 0))
        by_slot[slot] = (requests + int(entry["num_requests"]), failures + int(entry["num_failures"]))
    top = top_failure(failures_csv) if failures_csv is not None and failures_csv.exists() else ""
    return LoadStats(
        sum(int(e["num_requests"]) for e in entries),
        sum(int(e["num_failures"]) for e in entries),
        float(max((e.get("max_response_time") or 0 for e in entries), default=0)),
        by_slot,
        top,
    )


def top_failure(failures_csv: Path) -> str:
    """The most frequent failure of a Locust run, e.g. "HTTP 503 x12" ("" when none)."""
    with open(failures_csv, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("Error")]
    if not rows:
        return ""
    worst = max(rows, key=lambda r: int(r["Occurrences"] or 0))
    error = " ".join(worst["Error"].split())
    return f"{error[:80]} x{int(worst['Occurrences']):,}"


def share_percent(shares: dict[str, int], slot: str) -> float:
    total = sum(shares.values())
    return 100.0 * shares.get(slot, 0) / total if total else 0.0


def split_matches(shares: dict[str, int], candidate: str, weight: int, tolerance: float = 8.0) -> bool:
    """Does the candidate's share of `shares` match `weight`? Exact at 0% and 100%."""
    if not sum(shares.values()):
        return False
    if weight in (0, 100):
        others = sum(n for slot, n in shares.items() if slot != candidate)
        return (shares.get(candidate, 0) if weight == 0 else others) == 0
    return abs(share_percent(shares, candidate) - weight) <= tolerance


# -- settings and environment ----------------------------------------------------------------
def chaos_settings(**overrides: Any) -> StackSettings:
    """The chaos stack: its own folder and ten distinct free ports (never 8080 and friends)."""
    ports: list[int] = []
    while len(ports) < len(PORT_FIELDS):
        if (port := free_port()) not in ports:
            ports.append(port)
    return StackSettings(**{"name": STACK_NAME, **dict(zip(PORT_FIELDS, ports, strict=True)), **overrides})


def stack_env(settings: StackSettings) -> dict[str, str]:
    """CANARY_STACK_* so that a `canary` subprocess drives this very stack."""
    return {
        f"CANARY_STACK_{key.upper()}": json.dumps(value) if isinstance(value, list | dict) else str(value)
        for key, value in settings.model_dump().items()
    }


@dataclass(frozen=True)
class Release:
    bento: str
    version: str

    def pair(self) -> tuple[str, str]:
        return self.bento, self.version


def pick_releases(built: dict[int, str], champion: int | None) -> tuple[Release, Release] | None:
    """(stable, candidate) among built versions {version: bento tag}: the champion (else the
    newest) stays stable, the newest other version is the candidate. None with fewer than two."""
    if len(built) < 2:
        return None
    stable = champion if champion in built else max(built)
    candidate = max(v for v in built if v != stable)
    return Release(built[stable], str(stable)), Release(built[candidate], str(candidate))


def ensure_releases(home: CanaryHome, say: Say) -> tuple[Release, Release]:
    """Two built versions: reuse the state folder's, else train, export and build quick ones."""
    from models.bento import build_bento, find_bento
    from models.pipeline import export_version, train_and_register
    from models.registry import Registry
    from models.train import TrainConfig

    registry = Registry(home)
    built: dict[int, str] = {}
    for mv in registry.client.search_model_versions(f"name='{registry.name}'"):
        try:
            built[int(mv.version)] = find_bento(home, str(mv.version))[0]
        except CanaryError:
            continue  # registered but not exported/built (or its run did not finish)
    while (picked := pick_releases(built, _champion(registry))) is None:
        say(f"need two built model versions, have {len(built)}: training digits-cnn ({TRAIN_EPOCHS} epochs)")
        trained = train_and_register(home, TrainConfig(model="digits-cnn", epochs=TRAIN_EPOCHS, seed=0), say)
        version = trained.ref.version
        say(f"exporting and building version {version}")
        export_version(home, version=version, say=say)
        built[version] = build_bento(home, version=version, say=say).tag
    return picked


def _champion(registry) -> int | None:
    from models.registry import CHAMPION

    try:
        return registry.resolve(alias=CHAMPION).version
    except CanaryError:
        return None


# -- main ------------------------------------------------------------------------------------
def _printer(stream, start: float) -> Say:
    def say(message: str) -> None:
        stream.write(f"[{time.monotonic() - start:5.0f}s] {message}\n")
        stream.flush()

    return say


def main(argv: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    argv = list(argv or [])
    only = None
    if argv[:1] == ["--only"] and len(argv) == 2:
        only = argv[1]
    elif argv:
        print("usage: python -m deploy.chaos [--only WORDS]   (make chaos [ONLY=WORDS]: the drills whose name "
              "contains WORDS)", file=sys.stderr)  # fmt: skip
        return 2
    start = time.monotonic()
    say = _printer(sys.stdout, start)
    os.environ.setdefault("CANARY_ACTOR", "chaos")  # `canary history` says who moved traffic
    results: list[DrillResult] = []
    try:
        home = CanaryHome()
        home.create()
        home.activate()
        say(f"state folder {home.home}")
        stable, candidate = ensure_releases(home, say)
        say(f"stable {stable.bento} (model {stable.version}), candidate {candidate.bento} (model {candidate.version})")
        from deploy.chaos_drills import Drills

        drills = Drills(home, chaos_settings(), stable, candidate, say)
        try:
            drills.start()
            drills.run(results, only)
        finally:
            say("stopping the chaos stack")
            drills.stop()
    except KeyboardInterrupt:
        print("\nchaos: interrupted; everything the drills started is stopped", file=sys.stderr)
        _print_table(results)
        return 130
    except (CanaryError, OSError) as exc:
        print(f"chaos: error: {one_line(exc)}", file=sys.stderr)
        _print_table(results)
        return 1
    _print_table(results)
    seconds = time.monotonic() - start
    text = render_markdown(results, drills.meta(seconds))
    latest = home.home / STACK_NAME / "report.md"
    for path in (drills.folder / "report.md", latest):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    ok = sum(r.ok for r in results)
    print(f"{ok} of {len(results)} drills ok in {seconds / 60:.1f} minutes; Markdown table: {latest}")
    return exit_code(results)


def _print_table(results: Sequence[DrillResult]) -> None:
    if results:
        print(f"\n{render_text(results)}\n", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
