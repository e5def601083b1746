"""`canary status --watch`: the target's status redrawn in place until Ctrl-C (rich Live),
like `kubectl argo rollouts get rollout --watch`. Any target: it only calls `status()`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from models.errors import CanaryError


def render(target: Any, now: Callable[[], str] = lambda: time.strftime("%H:%M:%S")) -> str:
    """One frame: the status text, or the one-line reason it cannot be read right now."""
    try:
        body = target.format_status(target.status())
    except CanaryError as exc:
        body = f"status unavailable: {exc}"
    return f"canary status --target {target.name}   {now()}   (Ctrl-C to stop)\n\n{body}"


def watch_status(target: Any, interval_s: float = 2.0, frames: int | None = None) -> None:
    """Redraw every `interval_s`; `frames` bounds the loop (tests), None runs until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    drawn = 0
    try:
        with Live(Text(render(target)), console=console, auto_refresh=False, transient=False) as live:
            while frames is None or drawn < frames:
                live.update(Text(render(target)), refresh=True)
                drawn += 1
                if frames is None or drawn < frames:
                    time.sleep(interval_s)
    except KeyboardInterrupt:
        pass
