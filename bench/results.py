"""The benchmark's result types and the pure arithmetic on them (rows, ratios, targets).

Nothing here starts a process or reads a clock: the smoke test feeds it recorded numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.cache_mix import CacheMix

SATURATED, FIXED, CACHE_HIT = "saturated", "fixed", "cache-hit"


@dataclass(frozen=True)
class Measurement:
    """One measured window against one endpoint."""

    model: str
    contender: str
    label: str
    kind: str  # "project" | "alternative"
    protocol: str
    mode: str  # SATURATED | FIXED | CACHE_HIT
    connections: int
    rows_per_request: int
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # non-2xx (non-OK) answers + socket errors
    statuses: dict[str, int] = field(default_factory=dict)
    offered_rps: float | None = None  # fixed-load runs: the paced rate asked for
    loadgen: str = "wrk"
    loadgen_cpu_share: float = 0.0  # of the whole machine (1.0 = every core busy)
    server_cpu_share: float = 0.0
    other_cpu_share: float = 0.0  # everything else on the machine (other users' tests: noise)
    baseline: str | None = None
    server_cpu_s: float = 0.0  # CPU seconds the server's process tree burnt in the window

    @property
    def server_cpu_s_per_1k(self) -> float | None:
        """Server CPU-seconds per 1,000 answered requests (= CPU ms per request)."""
        return 1000 * self.server_cpu_s / self.requests if self.requests and self.server_cpu_s > 0 else None

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request

    @property
    def unavailable(self) -> int:
        """503 (REST) or UNAVAILABLE (gRPC) answers."""
        return self.statuses.get("503", 0) + self.statuses.get("UNAVAILABLE", 0)


@dataclass(frozen=True)
class TableRow:
    model: str
    contender: str
    label: str
    kind: str
    protocol: str
    rps: float  # saturated
    rows_per_s: float
    p50_ms: float | None  # at the fixed offered load
    p99_ms: float | None
    fixed_rps: float | None  # achieved at the fixed offered load
    offered_rps: float | None
    errors: int  # both runs
    unavailable_fixed: int  # 503/UNAVAILABLE at the fixed load (target: none)
    vs_best_alternative: float | None
    vs_limit: float | None
    vs_baseline: float | None
    loadgen_cpu_share: float
    server_cpu_share: float
    other_cpu_share: float  # the worse of the two runs
    server_cpu_s_per_1k: float | None = None  # at saturation

    def cores_for(self, rps: float) -> float | None:
        """Cores of this machine's kind this server needs for `rps` requests/s (CPU-bound)."""
        return rps * self.server_cpu_s_per_1k / 1000 if self.server_cpu_s_per_1k else None


INT8_CONTENDER = "bento-int8"
INT8_CONTENDERS = (INT8_CONTENDER, "bento-int8-2w")  # measured against the int8 graph's own limit
SLOT_CONTENDERS = {"fp32": ("bento", "bento-2w"), "int8": INT8_CONTENDERS}  # the project's slots, 1 and 2 workers
PEER_CONTENDERS = ("mlserver", "kserve", "litserve")  # the V2 servers users choose (bench/peers.py)
GRPC_CEILING = "grpc-ceiling"  # grpc.aio answering a fixed answer: the library's own ceiling
NGINX_CONTENDER = "bento-nginx"  # the direct Bento behind nginx (baseline: bento)
PREDLOG_CONTENDER = "bento-predlog"  # the direct Bento with log, drift and shadow diff on (baseline: bento)
PROJECT_DIRECT = ("bento", INT8_CONTENDER)  # the project called directly (fp32 or int8 export)


def _find(measurements: list[Measurement], model: str, contender: str, protocol: str, mode: str) -> Measurement | None:
    for m in measurements:
        if (m.model, m.contender, m.protocol, m.mode) == (model, contender, protocol, mode):
            return m
    return None


def best_alternative(measurements: list[Measurement], model: str) -> Measurement | None:
    """The alternative with the highest saturated rows/s for `model`."""
    alts = [m for m in measurements if m.model == model and m.kind == "alternative" and m.mode == SATURATED]
    return max(alts, key=lambda m: m.rows_per_s, default=None)


def fixed_rate(saturated: list[Measurement], fraction: float) -> float:
    """The fixed offered load: `fraction` of the slowest saturated throughput (requests/s)."""
    rates = [m.rps for m in saturated if m.mode == SATURATED and m.rps > 0]
    return fraction * min(rates) if rates else 0.0


def build_table(measurements: list[Measurement], limits: dict[str, float]) -> list[TableRow]:
    """One row per (model, contender, protocol), in measurement order."""
    rows = []
    for sat in (m for m in measurements if m.mode == SATURATED):
        fixed = _find(measurements, sat.model, sat.contender, sat.protocol, FIXED)
        best = best_alternative(measurements, sat.model)
        base = _find(measurements, sat.model, sat.baseline, sat.protocol, SATURATED) if sat.baseline else None
        limit = limits.get(f"{sat.model}:int8") if sat.contender in INT8_CONTENDERS else limits.get(sat.model)
        rows.append(
            TableRow(
                model=sat.model,
                contender=sat.contender,
                label=sat.label,
                kind=sat.kind,
                protocol=sat.protocol,
                rps=sat.rps,
                rows_per_s=sat.rows_per_s,
                p50_ms=fixed.p50_ms if fixed else None,
                p99_ms=fixed.p99_ms if fixed else None,
                fixed_rps=fixed.rps if fixed else None,
                offered_rps=fixed.offered_rps if fixed else None,
                errors=sat.errors + (fixed.errors if fixed else 0),
                unavailable_fixed=fixed.unavailable if fixed else 0,
                vs_best_alternative=sat.rows_per_s / best.rows_per_s if best and best.rows_per_s else None,
                vs_limit=sat.rows_per_s / limit if limit else None,
                vs_baseline=sat.rows_per_s / base.rows_per_s if base and base.rows_per_s else None,
                loadgen_cpu_share=sat.loadgen_cpu_share,
                server_cpu_share=sat.server_cpu_share,
                other_cpu_share=max(sat.other_cpu_share, fixed.other_cpu_share if fixed else 0.0),
                server_cpu_s_per_1k=sat.server_cpu_s_per_1k,
            )
        )
    return rows


@dataclass(frozen=True)
class CacheResult:
    model: str
    miss_rps: float  # cache off, same body repeated
    hit_rps: float  # cache on, same body repeated (every request after the first is a hit)
    hits: int  # redis keyspace hits counted during the run
    misses: int

    @property
    def ratio(self) -> float:
        return self.hit_rps / self.miss_rps if self.miss_rps else 0.0


def cache_results(measurements: list[Measurement], redis_counts: dict[str, tuple[int, int]]) -> list[CacheResult]:
    out = []
    for hit in (m for m in measurements if m.mode == CACHE_HIT):
        miss = _find(measurements, hit.model, hit.contender, hit.protocol, SATURATED)
        hits, misses = redis_counts.get(hit.model, (0, 0))
        out.append(CacheResult(hit.model, miss.rps if miss else 0.0, hit.rps, hits, misses))
    return out


@dataclass(frozen=True)
class Target:
    """One of the issue's targets, judged from this run's numbers."""

    name: str
    value: float | None
    threshold: str
    passed: bool | None  # None: not measured in this run
    detail: str = ""


def _best_project(table: list[TableRow], model: str) -> TableRow | None:
    rows = [
        r
        for r in table
        if r.model == model and r.kind == "project" and r.vs_baseline is None and r.contender in PROJECT_DIRECT
    ]
    return max(rows, key=lambda r: r.rows_per_s, default=None)


def judge_targets(
    table: list[TableRow], cache: list[CacheResult], in_turns: float | None = None, cache_mix: CacheMix | None = None
) -> list[Target]:
    """The issue's targets (issue 7), each passed / failed / not measured. `in_turns`: the
    live-traffic features' on/off throughput measured in turns, preferred to the table's
    `bento-predlog` row (one window each, minutes apart)."""
    targets: list[Target] = []

    def ratio_target(
        name: str, row: TableRow | None, attr: str, threshold: float, shown: str, strict: bool = False
    ) -> None:
        value = getattr(row, attr) if row else None
        passed = None if value is None else (value > threshold if strict else value >= threshold)
        detail = f"best project path: {row.contender} {row.protocol}" if row else "not measured"
        if row and attr == "vs_best_alternative":
            alts = [r for r in table if r.model == row.model and r.kind == "alternative"]
            best = max(alts, key=lambda r: r.rows_per_s, default=None)
            detail += f"; best alternative: {best.label} {best.protocol}" if best else "; no alternative ran"
        targets.append(Target(name, value, shown, passed, detail))

    heavy, cnn = _best_project(table, "digits-heavy"), _best_project(table, "digits-cnn")
    ratio_target("digits-heavy throughput vs best alternative", heavy, "vs_best_alternative", 2.0, ">= 2.0x")
    for precision, slots in SLOT_CONTENDERS.items():  # issue 16: each precision keeps its share of the machine
        best = max((r for r in table if r.model == "digits-heavy" and r.contender in slots and r.vs_limit is not None),
                   key=lambda r: r.vs_limit or 0.0, default=None)  # fmt: skip
        ratio_target(f"digits-heavy {precision} throughput vs its in-process limit", best, "vs_limit", 0.70, ">= 0.70")
    ratio_target(
        "digits-cnn throughput vs best alternative", cnn, "vs_best_alternative", 1.0, "> 1.0x (aim 1.5x)", strict=True
    )
    heavy_cache = next((c for c in cache if c.model == "digits-heavy"), None)
    targets.append(
        Target(
            "cache hits vs misses (digits-heavy)",
            heavy_cache.ratio if heavy_cache else None,
            ">= 3.0x",
            (heavy_cache.ratio >= 3.0) if heavy_cache else None,
            f"{heavy_cache.hits} redis hits" if heavy_cache else "not measured",
        )
    )
    targets.append(
        Target(
            "cache hits next to misses at saturation: hit p50 / miss p50",
            cache_mix.ratio if cache_mix else None,
            "<= 0.33",
            (cache_mix.ratio <= 1 / 3) if cache_mix else None,
            f"{cache_mix.model}, hits {cache_mix.hit_share:.0%} of the requests" if cache_mix else "not measured",
        )
    )
    fronted = [r for r in table if r.vs_baseline is not None and r.contender == NGINX_CONTENDER]
    worst_front = min(fronted, key=lambda r: r.vs_baseline or 0.0, default=None)
    targets.append(
        Target(
            "nginx in front: share of direct throughput",
            worst_front.vs_baseline if worst_front else None,
            ">= 0.85",
            (worst_front.vs_baseline >= 0.85) if worst_front and worst_front.vs_baseline is not None else None,
            f"{worst_front.contender} {worst_front.protocol}" if worst_front else "no fronted contender in this run",
        )
    )
    logged = next((r for r in table if r.contender == PREDLOG_CONTENDER and r.model == "digits-cnn"
                   and r.protocol == "rest-json" and r.vs_baseline is not None), None)  # fmt: skip
    share = in_turns if in_turns is not None else (logged.vs_baseline if logged else None)
    how = "windows in turns" if in_turns is not None else "the table's rows (one window each)"
    targets.append(
        Target(
            "prediction log, drift and shadow diff on: share of throughput with them off (digits-cnn V2 REST JSON)",
            share,
            ">= 0.90",
            None if share is None else share >= 0.90,
            "every answer logged to a Redis Stream, every row into the drift window, every request a shadow copy "
            f"compared with stable's; {how}"
            if share is not None
            else "not measured in this run",
        )
    )
    project = [r for r in table if r.kind == "project" and r.p50_ms and r.p99_ms is not None]
    worst_tail = max(project, key=lambda r: (r.p99_ms or 0) / (r.p50_ms or 1), default=None)
    tail = (worst_tail.p99_ms or 0) / (worst_tail.p50_ms or 1) if worst_tail else None
    targets.append(
        Target(
            "p99 / p50 at the fixed load (worst project row)",
            tail,
            "<= 3.0",
            (tail <= 3.0) if tail is not None else None,
            f"{worst_tail.model} {worst_tail.contender} {worst_tail.protocol}" if worst_tail else "not measured",
        )
    )
    unavailable = sum(r.unavailable_fixed for r in project)
    targets.append(
        Target(
            "503 / UNAVAILABLE below saturation (project rows)",
            float(unavailable),
            "== 0",
            unavailable == 0 if project else None,
        )
    )
    targets += _issue16_targets(table)
    return targets


def _protocol_family(protocol: str) -> str:
    return "gRPC" if protocol == "grpc" else "REST"


def _issue16_targets(table: list[TableRow]) -> list[Target]:
    """gRPC against the same slot's REST on digits-cnn, and the one-worker fp32 slot against the
    best V2 peer per model and protocol family (like for like: one process each)."""
    targets = []
    ceiling = next((r for r in table if (r.model, r.contender) == ("digits-cnn", GRPC_CEILING)), None)
    for slot, shown in (("bento", "1 worker"), ("bento-2w", "2 workers")):
        rows = [r for r in table if r.model == "digits-cnn" and r.contender == slot]
        grpc = next((r for r in rows if r.protocol == "grpc"), None)
        rest = max((r for r in rows if r.protocol != "grpc"), key=lambda r: r.rps, default=None)
        value = grpc.rps / rest.rps if grpc and rest and rest.rps else None
        detail = f"grpc {grpc.rps:,.0f} / {rest.protocol} {rest.rps:,.0f}" if grpc and rest else "not measured"
        if grpc and rest and grpc.loadgen_cpu_share is not None:
            detail += f"; h2load CPU {grpc.loadgen_cpu_share:.0%} of the machine"
        if grpc and ceiling and slot == "bento":
            detail += (f"; grpc.aio with an empty handler: {ceiling.rps:,.0f} calls/s, "
                       f"this gRPC path {grpc.rps / ceiling.rps:.0%} of it")  # fmt: skip
        targets.append(
            Target(f"digits-cnn gRPC calls/s vs the same slot's REST req/s ({shown})", value, ">= 0.60",
                   None if value is None else value >= 0.60, detail)
        )  # fmt: skip
    for model in dict.fromkeys(r.model for r in table):
        for family in ("REST", "gRPC"):
            ours = [
                r
                for r in table
                if (r.model, r.contender) == (model, "bento") and _protocol_family(r.protocol) == family
            ]
            peers = [r for r in table if r.model == model and r.contender in PEER_CONTENDERS
                     and _protocol_family(r.protocol) == family]  # fmt: skip
            mine = max(ours, key=lambda r: r.rows_per_s, default=None)
            peer = max(peers, key=lambda r: r.rows_per_s, default=None)
            value = mine.rows_per_s / peer.rows_per_s if mine and peer and peer.rows_per_s else None
            targets.append(
                Target(f"{model} V2 {family}: one worker vs the best V2 peer", value, "> 1.0x",
                       None if value is None else value > 1.0,
                       f"bento {mine.protocol} vs {peer.label} {peer.protocol}" if mine and peer else "no peer ran")
            )  # fmt: skip
    return targets
