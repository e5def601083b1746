"""`python -m bench.predlog_proof`: the prediction log's proofs on a served digits-cnn Bento.

Run once (minutes; not part of `make test`), its output goes into the README:

1. 10,000 requests, 16 at a time, each with its own `X-Request-Id`, to a Bento logging to a
   Redis Stream: every answer is logged (the stream holds exactly the ids sent), drops are
   0 (the slot's /metrics), and the window exports to Parquet.
2. The same 10,000 requests (same ids, same inputs) to a Bento logging to PostgreSQL: its
   export equals the Redis one field for field (time and latency aside).
3. Throughput on the V2 REST direct path, log off against log on: wrk windows taken in turns
   (off, on, off, on, ...) so that other load on the machine hits both alike; the ratio.

Uses the benchmark's home (`.canary/bench`; digits-cnn is trained there once and reused).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.live_traffic import metric

Say = Callable[[str], None]
REQUESTS = 10_000
CONCURRENCY = 16
INFER = "/v2/models/digits/infer"


async def _load(url: str, rows: Any, requests: int, concurrency: int) -> tuple[Counter[int], float]:
    """`requests` V2 JSON requests, `concurrency` at a time; request i carries id proof-i and row i."""
    import httpx

    statuses: Counter[int] = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            row = rows[i % len(rows)]
            body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]}
            try:
                answer = await client.post(url + INFER, json=body, headers={"X-Request-Id": f"proof-{i}"})
                statuses[answer.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1

    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return statuses, time.monotonic() - started


def _serve(bento: str, log: Path, extra: dict[str, str]):
    from deploy.process import free_port, served_bento

    rest = free_port()
    env = {"CANARY_SERVICE_REST_PORT": str(rest), "CANARY_SERVICE_GRPC_PORT": "0", "CANARY_SERVICE_SLOT": "proof",
           **extra}  # fmt: skip
    return served_bento(bento, free_port(), log, env), f"http://127.0.0.1:{rest}"


def prove_sink(name: str, bento: str, log_env: dict[str, str], store: Any, out: Path, requests: int,
               concurrency: int, say: Say) -> dict[str, Any]:  # fmt: skip
    """Load one Bento logging to `store`; check every id is logged, drops, export."""
    from bench.payloads import sample_rows
    from deploy.predictions import export_predictions

    rows = sample_rows(360)
    serving, v2 = _serve(bento, out / f"proof-{name}.log", log_env)
    since = time.time()
    with serving as base:
        statuses, seconds = asyncio.run(_load(v2, rows, requests, concurrency))
        answered = statuses.get(200, 0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            written = metric(base, "canary_prediction_log_written_total")
            dropped = metric(base, "canary_prediction_log_dropped_total")
            if written + dropped >= answered:
                break
            time.sleep(0.2)  # the writer flushes every 0.5 s; bounded by the deadline
    logged = [row["request_id"] for row in store.read_range(since - 1, time.time() + 1)]
    export = export_predictions(store, out / f"proof-{name}.parquet", since - 1, time.time() + 1)
    result = {
        "sink": name, "requests": requests, "answered_200": answered, "other_statuses": dict(statuses - Counter({200: answered})),
        "seconds": round(seconds, 1), "requests_per_s": round(requests / seconds),
        "rows_written": int(written), "dropped": int(dropped), "logged": len(logged),
        "logged_ids_are_the_ids_sent": sorted(logged) == sorted(f"proof-{i}" for i in range(requests)),
        "exported_rows": export.rows, "export": str(export.path),
    }  # fmt: skip
    say(f"  {name}: {answered:,}/{requests:,} answered 200 in {seconds:.1f}s; {int(written):,} rows written, "
        f"{int(dropped)} dropped; {len(logged):,} in the log (ids = ids sent: "
        f"{result['logged_ids_are_the_ids_sent']}); Parquet {export.rows:,} rows -> {export.path}")  # fmt: skip
    return result


def same_records(first: Path, second: Path) -> bool:
    import pyarrow.parquet as pq

    def rows(path: Path) -> list[dict]:
        return pq.read_table(path).drop(["time", "latency_ms"]).sort_by("request_id").to_pylist()

    return rows(first) == rows(second)


def throughput(bento: str, out: Path, seconds: float, rounds: int, say: Say) -> dict[str, Any]:
    """wrk on the V2 REST direct path of two Bentos, log off and log on, in turns."""
    from bench.payloads import sample_rows, to_v2_json
    from bench.processes import redis_server
    from bench.wrk import run_wrk

    payload = to_v2_json(sample_rows(1))
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with redis_server() as redis_url:
        off, off_v2 = _serve(bento, out / "throughput-off.log", {})
        on, on_v2 = _serve(bento, out / "throughput-on.log", {"CANARY_SERVICE_PREDICTION_LOG_URL": redis_url})
        with off, on:
            for url in (off_v2, on_v2):  # warm both
                run_wrk(url + INFER, payload, out / "wrk-warm", 2, 16)
            for index in range(rounds):
                for mode, url in (
                    (("off", off_v2), ("on", on_v2)) if index % 2 == 0 else (("on", on_v2), ("off", off_v2))
                ):
                    result = run_wrk(url + INFER, payload, out / f"wrk-{mode}-{index}", seconds, 16)
                    rates[mode].append(result.rps)
                    say(f"  log {mode:<3} window {index + 1}: {result.rps:,.0f} requests/s, {result.errors} errors")
    mean = {mode: sum(values) / len(values) for mode, values in rates.items()}
    ratio = mean["on"] / mean["off"]
    say(f"  mean: log off {mean['off']:,.0f} requests/s, log on {mean['on']:,.0f} requests/s: on/off = {ratio:.3f}")
    return {"windows": rates, "mean": mean, "ratio_on_off": ratio, "seconds_per_window": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.predlog_proof", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of one throughput window.")
    parser.add_argument("--rounds", type=int, default=3, help="Throughput windows per mode.")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, flush=True)

    from bench.config import DEFAULT_HOME
    from bench.prepare import BenchHome

    home = BenchHome(home=DEFAULT_HOME)
    home.activate()  # before bentoml is imported below
    os.environ["CANARY_HOME"] = str(home.home)
    for key in [k for k in os.environ if k.startswith("CANARY_SERVICE_")]:
        del os.environ[key]  # the servers start from the service's defaults
    home.create()
    from bench.prepare import prepare_model
    from bench.processes import postgres_server, redis_server
    from service.sinks import open_store

    out = home.home / "report" / "predlog-proof"
    out.mkdir(parents=True, exist_ok=True)
    say("preparing digits-cnn (reused when the bench home has it)")
    model = prepare_model(home, "digits-cnn", 3, False, lambda m: say(f"  {m}"))
    report: dict[str, Any] = {"bento": model.bento_tag, "requests": args.requests, "concurrency": args.concurrency}
    say(f"1-2. {args.requests:,} requests, {args.concurrency} at a time, to {model.bento_tag} logging to each sink")
    with redis_server() as redis_url, postgres_server() as (pg_url, pg_password):
        redis_store, pg_store = open_store(redis_url), open_store(pg_url, password=pg_password)
        report["redis"] = prove_sink("redis", model.bento_tag, {"CANARY_SERVICE_PREDICTION_LOG_URL": redis_url},
                                     redis_store, out, args.requests, args.concurrency, say)  # fmt: skip
        pg_env = {"CANARY_SERVICE_PREDICTION_LOG_URL": pg_url, "CANARY_SERVICE_PREDICTION_LOG_PASSWORD": pg_password}
        report["postgres"] = prove_sink("postgres", model.bento_tag, pg_env, pg_store, out, args.requests,
                                        args.concurrency, say)  # fmt: skip
    report["same_records"] = same_records(Path(report["redis"]["export"]), Path(report["postgres"]["export"]))
    say(f"  PostgreSQL received the same records as the Redis log: {report['same_records']}")
    if not args.skip_throughput:
        say(f"3. throughput, V2 REST JSON direct, 16 connections, {args.rounds} x {args.seconds:g}s per mode, in turns")
        report["throughput"] = throughput(model.bento_tag, out, args.seconds, args.rounds, say)
    (out / "proof.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    say(f"report: {out / 'proof.json'}")
    ok = report["same_records"] and all(
        report[s]["answered_200"] == args.requests and report[s]["logged_ids_are_the_ids_sent"]
        and report[s]["dropped"] == 0 for s in ("redis", "postgres")
    )  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
