"""Step 4: the report: JSON for machines, a Markdown table for people, a PNG bar chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.results import PREDLOG_CONTENDER, CacheResult, Measurement, TableRow, Target

METHOD_NOTES = (
    "Saturated: closed loop, {connections} connections (gRPC: {connections} calls in flight from h2load, C, "
    "over up to 8 HTTP/2 connections, every answer's gRPC status checked by its size; the fixed-load gRPC runs "
    "too, paced by h2load's --rps per connection, or by {grpc_processes} Python grpc.aio processes where h2load "
    "is missing: each measurement names its load generator); one fixed request body replayed; "
    "throughput over {duration_s:g} s after {warmup_s:g} s warm-up.",
    "Fixed load: wrk2 is not in Debian, so wrk paces requests itself (Lua `delay()` on a monotonic clock, "
    "at most {fixed_connections} in flight) at {fixed_fraction:g} x the slowest contender's saturated "
    "requests/s; no coordinated-omission correction. p50/p99 come from that run.",
    "Ratios use rows/s: vs best alternative = this row / the best alternative's saturated rows/s for the "
    "same model (any protocol); vs limit = this row / in-process ONNX Runtime at its best batch and threads.",
    "CPU shares are of the whole machine ({cores} cores); the load generator runs on the same machine. "
    "'other CPU' is what processes outside this benchmark burnt during the window (noise).",
)


def _num(value: float | None, fmt: str = ",.0f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, fmt)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _share(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if value < 0.1 else f"{value:.0%}"


def _pct(value: float) -> str:
    return f"{value:.0%}"


def markdown_table(
    table: list[TableRow], limits: dict[str, dict[str, Any]], refused: list[dict[str, str]] | None = None
) -> str:
    """One table per model; a server that could not be served (e.g. an int8 export its accuracy
    check refused) keeps its row, with the reason under the table."""
    lines = []
    refused = refused or []
    for model in dict.fromkeys([*(r.model for r in table), *(r["model"] for r in refused)]):
        limit = limits.get(model, {})
        head = f"### {model}"
        if limit:
            head += f" (limit {_num(limit['samples_per_s'])} samples/s in-process at batch {limit['batch']} x {limit['threads']} threads)"
        lines += [
            head,
            "",
            "| server | protocol | req/s | rows/s | p50 ms | p99 ms | at req/s | errors | vs best alt | vs limit | server CPU-s / 1k req | load-gen CPU | other CPU |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in (r for r in table if r.model == model):
            name = f"**{r.label}**" if r.kind == "project" else r.label
            of = {PREDLOG_CONTENDER: "them off", "bento-2w": "1 worker", "bento-int8-2w": "1 worker"}.get(
                r.contender, "direct"
            )
            extra = f" ({_ratio(r.vs_baseline)} of {of})" if r.vs_baseline is not None else ""
            lines.append(
                f"| {name}{extra} | {r.protocol} | {_num(r.rps)} | {_num(r.rows_per_s)} | {_num(r.p50_ms, '.1f')} | "
                f"{_num(r.p99_ms, '.1f')} | {_num(r.fixed_rps)} | {r.errors} | {_ratio(r.vs_best_alternative)} | "
                f"{_share(r.vs_limit)} | {_num(r.server_cpu_s_per_1k, '.2f')} | {_pct(r.loadgen_cpu_share)} | "
                f"{_pct(r.other_cpu_share)} |"
            )
        gone = [r for r in refused if r["model"] == model]
        lines += [f"| **{r['label']}** | - | refused | | | | | | | | | | |" for r in gone]
        lines += ["", *(f"{r['label']}: refused, {r['reason']}" for r in gone)] if gone else []
        lines.append("")
    return "\n".join(lines)


SCALE_OUT_RATE = 10_000  # requests/s: the rate the scale-out table sizes for


def markdown_scale_out(table: list[TableRow], rate: float = SCALE_OUT_RATE) -> str:
    """Cores (of this machine's kind) each project row needs for `rate` requests/s.

    CPU-bound arithmetic from the saturated run's server CPU per request: it holds while the
    work spreads over cores (workers, slots or pods) and the load balancer in front has room;
    it leaves out the load generator, nginx (its own row shows what it adds) and headroom.
    """
    rows = [r for r in table if r.kind == "project" and r.cores_for(rate)]
    if not rows:
        return ""
    lines = [
        f"### Scale-out: cores for {rate:,.0f} requests/s",
        "",
        "| model | server | protocol | server CPU-s / 1k req | cores | 1-worker slots at this row's req/s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        slots = math.ceil(rate / r.rps) if r.rps else None
        lines.append(
            f"| {r.model} | {r.label} | {r.protocol} | {_num(r.server_cpu_s_per_1k, '.2f')} | "
            f"{_num(r.cores_for(rate), '.1f')} | {_num(slots, ',d') if slots else '-'} |"
        )
    return "\n".join(lines) + "\n"


def markdown_cache(cache: list[CacheResult]) -> str:
    if not cache:
        return ""
    lines = [
        "### Response cache (this project, V2 REST JSON, same body repeated)",
        "",
        "| model | misses req/s (cache off) | hits req/s (cache on) | ratio | redis hits |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {c.model} | {_num(c.miss_rps)} | {_num(c.hit_rps)} | {c.ratio:.2f}x | {c.hits:,} |" for c in cache]
    return "\n".join(lines) + "\n"


def markdown_targets(targets: list[Target]) -> str:
    mark = {True: "pass", False: "**FAIL**", None: "not measured"}
    lines = [
        "### Targets (issues 7 and 16)",
        "",
        "| target | value | needs | verdict | detail |",
        "|---|---:|---|---|---|",
    ]
    lines += [f"| {t.name} | {_num(t.value, '.2f')} | {t.threshold} | {mark[t.passed]} | {t.detail} |" for t in targets]
    return "\n".join(lines) + "\n"


def render_markdown(
    report: dict[str, Any], table: list[TableRow], cache: list[CacheResult], targets: list[Target]
) -> str:
    m, v, c = report["machine"], report["versions"], report["config"]
    stamp = (
        f"{report['timestamp']} · {m['cpu_model']}, {m['cores']} cores · python {v['python']}, bentoml {v['bentoml']}, "
        f"onnxruntime {v['onnxruntime']}, torch {v['torch']}, mlflow {v['mlflow']} · {c['workers']} worker(s) per server"
        + (" · QUICK (smoke) run" if c["quick"] else "")
        + "".join(f" · {name}={value}" for name, value in c.get("service_settings") or ())
    )
    notes = [n.format(cores=m["cores"], **c) for n in METHOD_NOTES] + list(report.get("notes", []))
    parts = [
        "## Serving benchmark", "", stamp, "",
        markdown_table(table, report["limits"], report.get("refused")), markdown_scale_out(table), markdown_cache(cache),
        markdown_targets(targets),
        "Method:", "", *[f"- {n}" for n in notes], "",
    ]  # fmt: skip
    return "\n".join(parts)


def build_report(
    config: dict[str, Any],
    machine: dict[str, Any],
    versions: dict[str, str],
    timestamp: str,
    limits: dict[str, dict[str, Any]],
    measurements: list[Measurement],
    table: list[TableRow],
    cache: list[CacheResult],
    targets: list[Target],
    notes: list[str],
    failures: list[str],
) -> dict[str, Any]:
    return {
        "timestamp": timestamp,
        "machine": machine,
        "versions": versions,
        "config": config,
        "limits": limits,
        "measurements": [{**asdict(m), "rps": m.rps, "rows_per_s": m.rows_per_s} for m in measurements],
        "table": [asdict(r) for r in table],
        "cache": [{**asdict(c), "ratio": c.ratio} for c in cache],
        "targets": [asdict(t) for t in targets],
        "notes": notes,
        "failures": failures,
    }


def render_chart(table: list[TableRow], limits: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Horizontal bars of saturated rows/s per server and protocol, one panel per model,
    the in-process limit as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in table))
    fig, axes = plt.subplots(
        len(models), 1, figsize=(10, 1.2 + 0.55 * max(1, len(table)) + 0.8 * len(models)), squeeze=False
    )
    for ax, model in zip(axes[:, 0], models, strict=True):
        rows = [r for r in table if r.model == model][::-1]
        labels = [f"{r.label} · {r.protocol}" for r in rows]
        values = [r.rows_per_s for r in rows]
        colors = ["#1f77b4" if r.kind == "project" else "#9e9e9e" for r in rows]
        bars = ax.barh(labels, values, color=colors)
        for bar, row in zip(bars, rows, strict=True):
            note = f" {row.rows_per_s:,.0f}" + (
                f"  ({row.vs_best_alternative:.2f}x best alt)" if row.vs_best_alternative else ""
            )
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
        limit = limits.get(model)
        if limit:
            ax.axvline(limit["samples_per_s"], color="#d62728", linestyle="--", linewidth=1)
            label = f"in-process limit {limit['samples_per_s']:,.0f}"
            ax.text(
                limit["samples_per_s"],
                1.01,
                label,
                transform=ax.get_xaxis_transform(),
                color="#d62728",
                fontsize=8,
                va="bottom",
                ha="center",
            )
        ax.set_title(model, fontsize=10, loc="left")
        right = max([*values, (limit or {}).get("samples_per_s", 0)], default=1)
        smallest = min([v for v in values if v > 0], default=1)
        if right / smallest > 20:  # a far-away limit would flatten every bar: log scale
            ax.set_xscale("log")
            ax.set_xlim(smallest / 2, right * 4)
            ax.set_xlabel("rows/s (saturated, log scale)")
        else:
            ax.set_xlim(0, right * 1.35)
            ax.set_xlabel("rows/s (saturated)")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, report: dict[str, Any], markdown: str, table: list[TableRow]) -> dict[str, Path]:
    """Write report.json, report.md and report.png (plus timestamped copies of the JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "chart": out / "report.png"}
    text = json.dumps(report, indent=2, default=str)
    paths["json"].write_text(text)
    (out / f"report-{report['timestamp'].replace(':', '')}.json").write_text(text)
    paths["markdown"].write_text(markdown)
    title = f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores · {report['timestamp']}"
    render_chart(table, report["limits"], paths["chart"], title)
    return paths
