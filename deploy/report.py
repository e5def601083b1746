"""Human-readable renderings of stack status for the CLI."""

from __future__ import annotations


def format_status(data: dict) -> str:
    lines = []
    nginx = data["nginx"]
    state = "up" if nginx["running"] else "DOWN"
    lines.append(
        f"nginx {state}: REST :{nginx['rest']}  gRPC :{nginx['grpc']}    redis {'up' if data['redis'] else 'DOWN'}"
    )
    if data.get("engine"):  # the compose target's container engine
        lines.append(f"engine: {data['engine']}")
    router_slots = (nginx.get("router") or {}).get("slots", {})
    counts = {name: info.get("requests", 0) for name, info in router_slots.items()}
    down = {name for name, info in router_slots.items() if info.get("down")}
    lines.append(f"{'slot':<6} {'role':<10} {'weight':>6}  {'bento':<22} {'version':>7}  {'health':<9} {'requests':>8}")
    for name, slot in data["slots"].items():
        health = "healthy" if slot["healthy"] else ("DEAD" if slot["bento"] and not slot["alive"] else "-")
        if slot["alive"] and not slot["healthy"]:
            health = "UNHEALTHY"
        if name in down:
            health += " (nginx: down)"
        lines.append(
            f"{name:<6} {slot['role']:<10} {slot['weight']:>5}%  {slot['bento'] or '-':<22} "
            f"{slot['model_version'] or '-':>7}  {health:<9} {counts.get(name, 0):>8}"
        )
    if baking := data.get("baking"):
        lines.append(
            f"baking: slot {baking['slot']} promoted at {baking['since']} for {baking['bake_s']:g}s; "
            f"slot {baking['previous']} kept warm (`canary rollback` switches back)"
        )
    if data.get("shadow"):
        lines.append("shadow: stable traffic is mirrored to the candidate")
    if "online_accuracy" in data:
        lines.append(format_online_accuracy(data["online_accuracy"]))
    gate = data.get("last_gate")
    lines.append(f"last gate: {gate['verdict']} ({gate.get('summary', '')})" if gate else "last gate: -")
    if data.get("note"):
        lines.append(f"note: {data['note']}")
    return "\n".join(lines)


def format_online_accuracy(tallies: dict) -> str:
    """One line: per model version, the share of labelled rows predicted right (feedback)."""
    if "error" in tallies:
        return f"online accuracy: unavailable ({tallies['error']})"
    if not tallies:
        return "online accuracy: no labels yet (POST /v2/models/<model>/feedback)"
    parts = [f"version {version} {t['accuracy']:.1%} of {t['labels']} labels" for version, t in tallies.items()]
    return "online accuracy: " + "; ".join(parts)


def check_lines(checks, waiting: frozenset[str] = frozenset()) -> list[str]:
    """A verdict's checks, one line each: ok, FAIL, or wait (undecided, needs more data)."""
    return [
        f"  {'ok  ' if c.passed else 'wait' if c.name in waiting else 'FAIL'} {c.name} "
        f"{'n/a' if c.value is None else f'{c.value:.4g}'} (limit {c.limit:g}): {c.detail}"
        for c in checks
    ]


def versions_line(counts: dict) -> str:
    """'v1: 720, v2: 3' for rows per model version, 'none' without any."""
    return ", ".join(f"v{v}: {n:,}" for v, n in sorted(counts.items())) or "none"
