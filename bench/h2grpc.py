"""V2 gRPC load from h2load (Debian's nghttp2-client, C): a load generator that is not the
bottleneck. The Python `grpcload` children burn about as much CPU per call as the server,
so on a small machine they cap what a gRPC server can show; h2load sends a pre-framed
`ModelInferRequest` (gRPC's 5-byte length prefix + the serialized message) as an HTTP/2 POST
with gRPC's headers, over `clients` connections with `streams` calls in flight each.

h2load sees HTTP statuses, not gRPC's (`grpc-status` travels in the trailers), so every
answer is checked by size instead: an OK answer to the same request is always the same number
of bytes (measured once with a real gRPC call before the run), an error carries no message.
The received DATA bytes over the answered calls give how many were OK; the rest count as
errors ("grpc-error"). Latencies come from h2load's per-request log.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.cpu import run_accounted
from bench.payloads import Payload
from bench.wrk import LoadResult

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_CLIENTS = 8  # connections: enough for SO_REUSEPORT to spread them over a slot's workers

_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_DATA = re.compile(r"\((\d+)\) data")


def h2load_path() -> str | None:
    return shutil.which("h2load")


def h2load_duration(seconds: float) -> str:
    """h2load takes whole numbers with a unit ("500ms"); "0.5" or "0.5s" is a value error."""
    return f"{max(1, round(seconds * 1000))}ms"


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: 1 byte uncompressed flag, 4 bytes big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def ok_answer_bytes(target: str, message: bytes) -> int:
    """Framed size of the server's OK answer to `message` (one real gRPC call)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        answer = channel.unary_unary(METHOD)(message, timeout=30)  # bytes in, bytes out
    return len(grpc_frame(answer))


def shape(connections: int) -> tuple[int, int]:
    """(clients, streams per client) for `connections` calls in flight."""
    clients = max(1, min(MAX_CLIENTS, connections))
    return clients, max(1, math.ceil(connections / clients))


def parse_h2load(output: str, log_rows: np.ndarray, answer_bytes: int, duration_s: float) -> LoadResult:
    """h2load's summary and per-request log -> one LoadResult (see the module docstring)."""
    counts = _REQUESTS.search(output)
    codes = _STATUS.search(output)
    data = _DATA.search(output)
    if counts is None or codes is None or data is None:
        raise ValueError(f"not h2load output: {output[-300:]!r}")
    _total, _started, done, succeeded, failed, errored = (int(g) for g in counts.groups())
    ok = min(succeeded, int(data.group(1)) // answer_bytes) if answer_bytes else succeeded
    grpc_errors = succeeded - ok
    answered = log_rows[log_rows[:, 1] >= 0] if log_rows.size else log_rows  # status -1: a failed stream
    latencies = answered[:, 2] / 1000.0 if answered.size else np.zeros(0)
    p50, p90, p99 = (float(np.percentile(latencies, q)) if latencies.size else float("nan") for q in (50, 90, 99))
    statuses = {"OK": ok}
    for name, value in (("grpc-error", grpc_errors), ("failed", failed), ("errored", errored)):
        if value:
            statuses[name] = value
    non_2xx = sum(int(g) for g in codes.groups()[1:])
    return LoadResult(
        requests=done,
        duration_s=duration_s,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(latencies.max()) if latencies.size else float("nan"),
        statuses=statuses,
        socket_errors=failed + errored,
        non_2xx=non_2xx + grpc_errors,
    )


def _read_log(path: Path) -> np.ndarray:
    """h2load's per-request log: start (us since epoch), HTTP status, duration (us)."""
    if not path.is_file() or path.stat().st_size == 0:
        return np.zeros((0, 3))
    return np.loadtxt(path, dtype=np.float64, delimiter="\t", ndmin=2, usecols=(0, 1, 2))


def run_h2load_grpc(
    target: str,
    payload: Payload,
    workdir: Path,
    duration_s: float,
    connections: int,
    warmup_s: float,
    rate: float = 0.0,
) -> LoadResult:
    """Load `target` (host:port) with at most `connections` calls in flight for `duration_s`
    after `warmup_s` of warm-up: closed loop (saturation), or `rate` calls/s in all, spread
    evenly over h2load's clients (`--rps` each). Its CPU (h2load is our child) is the load
    generator's."""
    binary = h2load_path()
    if binary is None:
        raise RuntimeError("h2load is not installed (Debian package nghttp2-client)")
    workdir.mkdir(parents=True, exist_ok=True)
    body = workdir / "grpc-request.bin"
    body.write_bytes(grpc_frame(payload.body))
    answer_bytes = ok_answer_bytes(target, payload.body)
    request_log = workdir / "h2load-requests.tsv"
    clients, streams = shape(connections)
    common = [
        binary, "-t", "1", "-c", str(clients), "-m", str(streams), "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
    ]  # fmt: skip
    if rate > 0:  # a fixed offered load, paced in C: no Python client's jitter in the latencies
        common += [f"--rps={rate / clients:.3f}"]
    url = f"http://{target}{METHOD}"
    if warmup_s > 0:  # a run of its own: h2load's --warm-up-time still counts the warm-up's bytes
        _run(common + ["-D", h2load_duration(warmup_s), url], workdir / "h2load-warmup.log", warmup_s)
    argv = common + ["-D", h2load_duration(duration_s), f"--log-file={request_log}", url]
    run = _run(argv, workdir / "h2load.log", duration_s)
    result = parse_h2load(run.output, _read_log(request_log), answer_bytes, duration_s)
    return replace(result, loadgen_cpu_s=run.cpu_s)


def _run(argv: list[str], log: Path, duration_s: float):
    run = run_accounted(argv, log, timeout_s=duration_s + 60)
    if run.returncode != 0:
        raise RuntimeError(f"h2load exited with {run.returncode}: {run.output[-500:]}")
    return run
