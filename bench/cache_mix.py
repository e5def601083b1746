"""Cache hits next to misses at saturation (issue 16): does a hit skip the model's queue?

One Bento with the response cache on (a throw-away redis-server), two wrk processes at once
on its V2 REST JSON endpoint, closed loop, half the connections each: one repeats one body
(after the first request every answer is a cache hit), the other sends a new input every
request (two pixels counted up from a Lua `request()`: every request a miss, the model runs).
Both see the same server at the same moment, so their p50s compare what the two paths cost
under the same load. The target: hit p50 at most a third of miss p50.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.payloads import Payload

# Fills the two placeholders of the body (the first two pixels) with a counter, so no two
# requests of a run carry the same input: 4096 x 4096 values, each a multiple of 1/256 in [0, 16).
DISTINCT_INPUTS = r"""
local head, middle, tail = nil, nil, nil
local sent = 0
function request()
  if head == nil then
    local a = string.find(wrk.body, "11111.5", 1, true)
    local b = string.find(wrk.body, "22222.5", 1, true)
    head, middle, tail = string.sub(wrk.body, 1, a - 1), string.sub(wrk.body, a + 7, b - 1), string.sub(wrk.body, b + 7)
  end
  sent = sent + 1
  local k = sent * 7919  -- odd: k modulo 2^24 differs for every request of a run
  local body = head .. ((k % 4096) / 256) .. middle .. (math.floor(k / 4096) % 4096 / 256) .. tail
  return wrk.format(nil, nil, nil, body)
end
"""


def distinct_payload(payload: Payload) -> Payload:
    """`payload` (V2 REST JSON) with its first two pixels as placeholders for the Lua counter."""
    body = json.loads(payload.body)
    data = body["inputs"][0]["data"]
    data[0], data[1] = 11111.5, 22222.5
    return replace(payload, body=json.dumps(body, separators=(",", ":")).encode())


@dataclass(frozen=True)
class CacheMix:
    model: str
    hit_rps: float
    miss_rps: float
    hit_p50_ms: float
    miss_p50_ms: float
    hit_p99_ms: float
    miss_p99_ms: float
    redis_hits: int
    seconds: float

    @property
    def ratio(self) -> float:
        """Hit p50 / miss p50: what the target judges (at most 1/3)."""
        return self.hit_p50_ms / self.miss_p50_ms if self.miss_p50_ms > 0 else float("inf")

    @property
    def hit_share(self) -> float:
        return self.hit_rps / (self.hit_rps + self.miss_rps) if self.hit_rps + self.miss_rps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hit_p50_over_miss_p50": round(self.ratio, 3), "hit_share": round(self.hit_share, 3)}

    def markdown(self) -> str:
        return (
            "### Cache hits next to misses, at saturation\n\n"
            f"{self.model} V2 REST JSON, response cache on, two wrk at once for {self.seconds:g} s, half the "
            f"connections each: one body repeated (hits) and a new input every request (misses).\n\n"
            "| requests | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|\n"
            f"| hits | {self.hit_rps:,.0f} | {self.hit_p50_ms:.2f} | {self.hit_p99_ms:.2f} |\n"
            f"| misses | {self.miss_rps:,.0f} | {self.miss_p50_ms:.2f} | {self.miss_p99_ms:.2f} |\n\n"
            f"Hit p50 / miss p50 = **{self.ratio:.2f}**; hits were {self.hit_share:.0%} of the requests "
            f"({self.redis_hits:,} Redis hits).\n"
        )


def measure_cache_mix(
    model: Any, ctx: Any, seconds: float, connections: int, workdir: Path, say: Callable[[str], None]
) -> CacheMix:
    from bench.contenders import ProjectBento
    from bench.processes import redis_hits, redis_server
    from bench.wrk import run_wrk

    half = max(1, connections // 2)
    with redis_server() as url, ProjectBento(name="bento-cache-mix", cache_url=url).serve(model, ctx) as served:
        endpoint = next(e for e in served.endpoints if e.protocol == "rest-json")
        misses = distinct_payload(endpoint.payload)
        run_wrk(endpoint.target, endpoint.payload, workdir / "warm", 2, half)  # (a miss warm-up would
        # cache the inputs the measured miss run sends again: its counter starts at 1 each run)
        before = redis_hits(url)
        with ThreadPoolExecutor(2) as pool:
            hit_run = pool.submit(run_wrk, endpoint.target, endpoint.payload, workdir / "hits", seconds, half)
            miss_run = pool.submit(
                run_wrk, endpoint.target, misses, workdir / "misses", seconds, half, lua_request=DISTINCT_INPUTS
            )
            hits, missed = hit_run.result(), miss_run.result()
        after = redis_hits(url)
    if hits.errors or missed.errors:
        raise RuntimeError(f"{hits.errors} failed hit requests, {missed.errors} failed miss requests")
    result = CacheMix(
        model.architecture, hits.rps, missed.rps, hits.p50_ms, missed.p50_ms, hits.p99_ms, missed.p99_ms,
        after[0] - before[0], seconds,
    )  # fmt: skip
    say(
        f"  hits {result.hit_rps:,.0f} req/s p50 {result.hit_p50_ms:.2f} ms; misses {result.miss_rps:,.0f} req/s "
        f"p50 {result.miss_p50_ms:.2f} ms; hit p50 / miss p50 = {result.ratio:.2f}"
    )
    return result
