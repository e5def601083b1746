"""Step 2e: the compute limit, ONNX Runtime in this process at its best batch size and threads.

No server, no serialization: `session.run` in a loop on the same ONNX file, for every
(batch size, intra-op threads) point. The best samples/s is the ceiling a server's rows/s
is compared with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class LimitPoint:
    batch: int
    threads: int
    samples_per_s: float
    ms_per_batch: float


@dataclass(frozen=True)
class ComputeLimit:
    best: LimitPoint
    points: tuple[LimitPoint, ...]

    @property
    def samples_per_s(self) -> float:
        return self.best.samples_per_s


def measure_point(path: Path, rows: np.ndarray, batch: int, threads: int, seconds: float) -> LimitPoint:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(np.resize(rows, (batch, rows.shape[1])), dtype=np.float32)}
    for _ in range(3):  # allocation and thread-pool start-up are not the steady state
        session.run(None, feed)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
        session.run(None, feed)
        runs += 1
    return LimitPoint(batch, threads, runs * batch / elapsed, elapsed / runs * 1e3)


def compute_limit(
    path: Path, rows: np.ndarray, batches: tuple[int, ...], threads: tuple[int, ...], seconds: float, say=print
) -> ComputeLimit:
    points = []
    for t in threads:
        for b in batches:
            point = measure_point(path, rows, b, t, seconds)
            say(
                f"    batch {b:>4} x {t} thread(s): {point.samples_per_s:>9,.0f} samples/s ({point.ms_per_batch:.2f} ms/batch)"
            )
            points.append(point)
    return ComputeLimit(max(points, key=lambda p: p.samples_per_s), tuple(points))
