"""wrk as the HTTP load generator: a Lua script that replays one fixed body, and a parser.

A payload with `request_ids` > 0 sends each request under its own `X-Request-Id`
(`bench-<k>`, k counting modulo `request_ids`), for a server that records answers by id (the
prediction log's contender); otherwise wrk sends one fixed request (no per-request Lua).

Saturated runs keep `connections` requests in flight (closed loop). Fixed-load runs pace
requests with wrk's `delay()` hook against a LuaJIT FFI monotonic clock: one schedule per wrk
thread at the offered rate, at most `connections` in flight. That approximates wrk2's
constant throughput mode (not in Debian) without its coordinated-omission correction: when
the server falls behind, requests are sent as soon as a connection frees up.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import run_accounted
from bench.payloads import Payload

RESULT_PREFIX = "BENCH_JSON "

LUA_SCRIPT = r"""
-- Written by bench.wrk. args: body file, content type, rate per thread (0 = unpaced), extra headers "k=v;...".
local threads = {}
statuses = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[2]
  for k, v in string.gmatch(args[4] or "", "([^=;]+)=([^;]*)") do
    wrk.headers[k] = v
  end
  rate = tonumber(args[3]) or 0
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

%(pacing)s
%(ids)s

function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      merged[tostring(code)] = (merged[tostring(code)] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(merged) do
    table.insert(parts, string.format('"%%s":%%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    '%(prefix)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d},' ..
    '"latency_us":{"p50":%%d,"p90":%%d,"p99":%%d,"p999":%%d,"max":%%d,"mean":%%.1f},"statuses":{%%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, table.concat(parts, ",")))
end
"""

REQUEST_IDS = r"""
local sent = 0
function request()
  sent = sent + 1
  wrk.headers["X-Request-Id"] = "bench-" .. (sent %% %(count)d)
  return wrk.format()
end
"""

PACING = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local next_at = nil

function delay()
  if rate <= 0 then return 0 end
  local now = now_ms()
  next_at = (next_at or now) + 1000 / rate
  if next_at < now then  -- behind schedule: send now, never in a burst
    next_at = now
    return 0
  end
  return next_at - now
end
"""


def lua_script(paced: bool, request_ids: int = 0, lua_request: str = "") -> str:
    """The script; `lua_request` is a `request()` of the caller's (e.g. a body per request)."""
    ids = REQUEST_IDS % {"count": request_ids} if request_ids > 0 else lua_request
    return LUA_SCRIPT % {"pacing": PACING if paced else "", "ids": ids, "prefix": RESULT_PREFIX}


@dataclass(frozen=True)
class LoadResult:
    """One measured window of one load generator, in its own units (requests)."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: int = 0
    non_2xx: int = 0
    loadgen_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


def parse_wrk_output(text: str) -> LoadResult:
    """wrk's output -> LoadResult. Prefers our script's JSON line; falls back to wrk's own
    summary text (`--latency` distribution) when the script did not run."""
    for line in text.splitlines():
        if line.startswith(RESULT_PREFIX):
            return _from_json(json.loads(line[len(RESULT_PREFIX) :]))
    return _from_text(text)


def _from_json(data: dict) -> LoadResult:
    lat, err = data["latency_us"], data["errors"]
    statuses = {str(k): int(v) for k, v in data.get("statuses", {}).items()}
    non_2xx = sum(n for code, n in statuses.items() if not code.startswith("2")) if statuses else int(err["status"])
    return LoadResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=lat["p50"] / 1e3,
        p90_ms=lat["p90"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        max_ms=lat["max"] / 1e3,
        statuses=statuses,
        socket_errors=int(err["connect"] + err["read"] + err["write"] + err["timeout"]),
        non_2xx=non_2xx,
    )


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS_MS[unit]


def _from_text(text: str) -> LoadResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if done is None:
        raise ValueError(f"not wrk output: {text[:200]!r}")
    duration_ms = _ms(done.group(2) + done.group(3))
    percentiles = {
        m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|90|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", text, re.M)
    }
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+(?:us|ms|s|m))", text, re.M)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return LoadResult(
        requests=int(done.group(1)),
        duration_s=duration_ms / 1e3,
        p50_ms=percentiles.get("50", float("nan")),
        p90_ms=percentiles.get("90", float("nan")),
        p99_ms=percentiles.get("99", float("nan")),
        max_ms=_ms(latency.group(1)) if latency else float("nan"),
        socket_errors=sum(int(g) for g in socket.groups()) if socket else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError("wrk is not installed: apt-get install -y wrk")
    return found


def run_wrk(
    url: str,
    payload: Payload,
    workdir: Path,
    duration_s: float,
    connections: int,
    rate: float = 0.0,
    threads: int = 1,
    lua_request: str = "",
) -> LoadResult:
    """One wrk run against `url`; `rate` > 0 paces it (requests/s in total)."""
    workdir.mkdir(parents=True, exist_ok=True)
    script = workdir / ("paced.lua" if rate > 0 else "saturate.lua")
    script.write_text(lua_script(paced=rate > 0, request_ids=payload.request_ids, lua_request=lua_request))
    body = workdir / "body.bin"
    body.write_bytes(payload.body)
    extra = ";".join(f"{k}={v}" for k, v in payload.headers)
    threads = max(1, min(threads, connections))
    argv = [
        wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
        "--latency", "-s", str(script), url, "--", str(body), payload.content_type, f"{rate / threads:.3f}", extra,
    ]  # fmt: skip
    run = run_accounted(argv, workdir / "wrk.log", timeout_s=duration_s + 30)
    if run.returncode != 0:
        raise RuntimeError(f"wrk exited with {run.returncode}: {run.output[-500:]}")
    result = parse_wrk_output(run.output)
    return LoadResult(**{**result.__dict__, "loadgen_cpu_s": run.cpu_s})
