"""A small multi-process V2 gRPC load generator (ghz is not packaged for Debian).

The parent starts `processes` children (`python -m bench.grpcload ...`), each with
one `grpc.aio` channel and `concurrency` calls in flight, replaying one pre-serialized
`ModelInferRequest` (bytes in, bytes out: no protobuf work on the client). All children
share one wall-clock window (`--start-at`), so their counts add up; each writes its
latencies (float32 ms) and status counts to a file the parent merges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.cpu import run_accounted
from bench.payloads import Payload
from bench.wrk import LoadResult
from models.home import REPO_ROOT

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STARTUP_S = 3.0  # time the children get to import grpc and connect before the window opens


async def _drive(args: argparse.Namespace) -> tuple[list[float], Counter, float]:
    import grpc

    request = Path(args.request).read_bytes()
    latencies: list[float] = []
    codes: Counter = Counter()
    measure_from = args.start_at + args.warmup
    stop_at = measure_from + args.duration
    interval = args.concurrency / args.rate if args.rate > 0 else 0.0  # per-caller pacing
    async with grpc.aio.insecure_channel(args.target) as channel:
        call = channel.unary_unary(METHOD)  # no serializers: bytes are sent and returned as-is
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, args.start_at - time.time()))

        async def caller(offset: float) -> None:
            next_at = time.time() + offset
            while (now := time.time()) < stop_at:
                if interval:
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at + interval, time.time() - interval)  # behind: no burst
                sent = time.time()
                try:
                    await call(request, timeout=10)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                done = time.time()
                if measure_from <= done <= stop_at:
                    latencies.append((done - sent) * 1e3)
                    codes[code] += 1

        async def window_cpu() -> float:
            # process-wide CPU (grpc's own threads included) over the measured window only
            await asyncio.sleep(max(0.0, measure_from - time.time()))
            started = time.process_time()
            await asyncio.sleep(max(0.0, stop_at - time.time()))
            return time.process_time() - started

        *_, cpu = await asyncio.gather(
            *(caller(i * interval / args.concurrency) for i in range(args.concurrency)), window_cpu()
        )
    return latencies, codes, float(cpu or 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--request", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s of this process (0 = unpaced)")
    parser.add_argument("--start-at", type=float, required=True, help="wall-clock time the warm-up starts")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    latencies, codes, cpu = asyncio.run(_drive(args))
    out = Path(args.out)
    np.save(out.with_suffix(".npy"), np.asarray(latencies, dtype=np.float32))
    out.write_text(json.dumps({"codes": dict(codes), "cpu_s": cpu}))


def run_grpc_load(
    target: str,
    payload: Payload,
    workdir: Path,
    duration_s: float,
    concurrency: int,
    processes: int,
    warmup_s: float,
    rate: float = 0.0,
    start_at: float | None = None,
) -> LoadResult:
    """Run the children in parallel, wait for all, merge their windows into one LoadResult."""
    from concurrent.futures import ThreadPoolExecutor

    workdir.mkdir(parents=True, exist_ok=True)
    request = workdir / "request.bin"
    request.write_bytes(payload.body)
    start_at = start_at or time.time() + STARTUP_S
    per_process = max(1, concurrency // processes)

    def child(i: int):
        out = workdir / f"grpc-{i}.json"
        argv = [
            sys.executable, "-m", "bench.grpcload", "--target", target, "--request", str(request),
            "--out", str(out), "--concurrency", str(per_process), "--rate", f"{rate / processes:.3f}",
            "--start-at", f"{start_at:.3f}", "--warmup", str(warmup_s), "--duration", str(duration_s),
        ]  # fmt: skip
        log = workdir / f"grpc-{i}.log"
        return out, run_accounted(argv, log, timeout_s=STARTUP_S + warmup_s + duration_s + 30, cwd=REPO_ROOT)

    with ThreadPoolExecutor(processes) as pool:
        runs = list(pool.map(child, range(processes)))
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    cpu = 0.0
    for out, run in runs:
        if run.returncode != 0:
            raise RuntimeError(f"gRPC load process exited with {run.returncode}: {run.output[-500:]}")
        latencies.append(np.load(out.with_suffix(".npy")))
        written = json.loads(out.read_text())
        codes.update(written["codes"])
        cpu += written["cpu_s"]
    merged = np.concatenate(latencies) if latencies else np.zeros(0, dtype=np.float32)
    p50, p90, p99 = (float(np.percentile(merged, q)) if merged.size else float("nan") for q in (50, 90, 99))
    return LoadResult(
        requests=int(sum(codes.values())),
        duration_s=duration_s,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=float(merged.max()) if merged.size else float("nan"),
        statuses=dict(codes),
        non_2xx=sum(n for code, n in codes.items() if code != "OK"),
        loadgen_cpu_s=cpu,
    )


if __name__ == "__main__":
    main()
