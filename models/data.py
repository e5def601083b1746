"""The digits data set (bundled with scikit-learn, no download) and its fixed split.

Pixels stay raw (0-16 floats, exactly as the data set has them): clients send these and
every scaling step lives inside the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The split never depends on the training seed, so every model is judged on the same test set.
SPLIT_SEED = 20261122
N_FEATURES = 64
N_CLASSES = 10
PIXEL_RANGE = (0.0, 16.0)  # raw pixel values as the data set has them


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split() -> DigitsSplit:
    """60/20/20 stratified train/validation/test split of the 1797 digits, float32 pixels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SPLIT_SEED)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, stratify=y_rest, random_state=SPLIT_SEED
    )
    return DigitsSplit(x_train, y_train, x_val, y_val, x_test, y_test)
