"""The release state of the local stack and its audit trail, kept in the state folder.

`ReleaseState` is written atomically (temp file + rename) so a crash never leaves half a
file; `state_lock` serialises concurrent `canary` invocations; `History` appends one JSON
line per change (who, when, what, why).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from models.errors import CanaryError

SLOTS = ("blue", "green")


@dataclass(frozen=True)
class SlotState:
    bento: str | None = None  # e.g. digits-service:v3
    model_version: str | None = None


@dataclass(frozen=True)
class ReleaseState:
    """Who serves what. `candidate` is the slot that gets `weight` percent of traffic."""

    slots: dict[str, SlotState] = field(default_factory=lambda: {name: SlotState() for name in SLOTS})
    stable: str = "blue"
    candidate: str | None = None
    weight: int = 0
    shadow: bool = False
    generation: int = 0
    last_gate: dict[str, Any] | None = None
    note: str = ""  # e.g. "rollout interrupted at 25%: traffic held at 0%"
    # set from promote until its bake ends: {"slot": new stable, "previous": old stable (warm),
    # "since": ISO time, "bake_s": seconds}. While set, the old stable is the `candidate` at 0%.
    baking: dict[str, Any] | None = None

    @property
    def idle(self) -> str:
        return next(name for name in SLOTS if name != self.stable)

    def with_changes(self, **changes: Any) -> ReleaseState:
        return replace(self, generation=self.generation + 1, **changes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReleaseState:
        slots = {name: SlotState(**data.get("slots", {}).get(name, {})) for name in SLOTS}
        return cls(**{**data, "slots": slots})


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` so that readers see the old file or the new one, never half
    of one (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StateStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "state.json"
        self.history = History(folder / "history.jsonl")

    def load(self) -> ReleaseState:
        if not self.path.exists():
            return ReleaseState()
        try:
            return ReleaseState.from_json(json.loads(self.path.read_text()))
        except (ValueError, TypeError) as exc:
            raise CanaryError(f"release state {self.path} is unreadable ({exc}); fix or remove it") from None

    def save(self, state: ReleaseState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(state.to_json(), indent=2, sort_keys=True))

    @contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Serialise `canary` invocations that change traffic or processes."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as handle:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise CanaryError("another canary command holds the release lock; try again") from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def history_line(action: str, detail: str, reason: str = "", **extra: Any) -> str:
    """One audit entry as a JSON line: when, who (`CANARY_ACTOR` or the login), what, why.
    Every target's history keeps entries of this shape."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "who": os.environ.get("CANARY_ACTOR") or getpass.getuser(),
        "action": action,
        "detail": detail,
        "reason": reason,
        **extra,
    }
    return json.dumps(entry, sort_keys=True)


class History:
    """Append-only audit trail: one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, action: str, detail: str, reason: str = "", **extra: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(history_line(action, detail, reason, **extra) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
