"""Inputs and outputs of `canary score` tests: the 1,797 digits as files, predictions read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WIDTH = 64


def all_digits() -> np.ndarray:
    """The whole bundled data set, in its own order: float32 (1797, 64) raw pixels."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def pixel_table(x: np.ndarray) -> pa.Table:
    """64 numeric columns input_0..input_63, as the model card names them."""
    return pa.table({f"input_{i}": x[:, i] for i in range(x.shape[1])})


def write_digits_folder(folder: Path, split_at: int = 797) -> np.ndarray:
    """The digits as two Parquet files in name order, the second one larger (Spark reads the
    larger one first: input order must come back anyway); returns the rows in input order."""
    x = all_digits()
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pixel_table(x[:split_at]), folder / "part-a.parquet")
    pq.write_table(pixel_table(x[split_at:]), folder / "part-b.parquet")
    return x


def read_predictions(path: Path) -> pa.Table:
    return pq.read_table(path)
