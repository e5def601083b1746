"""Training: deterministic for a given seed, one epoch at a time, progress through a callback.

Three model kinds share one contract (`TrainedModel`): two PyTorch networks and a
scikit-learn pipeline, so the exporter is proven not to be torch-only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.data import DigitsSplit
from models.errors import CanaryError

SKLEARN_ARCHITECTURES = ("digits-linear",)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    model: str = "digits-cnn"
    epochs: int = 15
    seed: int = 0
    batch_size: int = 64
    learning_rate: float = 2e-3
    # "constant", or "cosine": the rate decays to 0 over the run (per batch), so the last
    # epochs settle instead of jumping between minima (digits-heavy's batch-normalised layers)
    lr_schedule: str = "constant"

    def validate(self) -> None:
        from models.nets import TORCH_ARCHITECTURES

        known = sorted([*TORCH_ARCHITECTURES, *SKLEARN_ARCHITECTURES])
        if self.model not in known:
            raise CanaryError(f"unknown model {self.model!r}; choose one of: {', '.join(known)}")
        if self.epochs < 1:
            raise CanaryError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise CanaryError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise CanaryError(
                f"unknown learning-rate schedule {self.lr_schedule!r}; choose one of: {', '.join(LR_SCHEDULES)}"
            )


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    loss: float
    val_accuracy: float


@dataclass
class TrainedModel:
    """What a training run produces: the model object and how it did."""

    config: TrainConfig
    flavor: str  # "pytorch" or "sklearn": the MLflow flavor that stores it
    model: Any
    history: list[EpochReport] = field(default_factory=list)
    test_accuracy: float = 0.0

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Class scores of the source model (logits for torch, probabilities for sklearn)."""
        return source_scores(self.flavor, self.model, x)


def source_scores(flavor: str, model: Any, x: np.ndarray) -> np.ndarray:
    if flavor == "pytorch":
        import torch

        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return model.predict_proba(x).astype(np.float32)


OnEpoch = Callable[[EpochReport], None]


def train(config: TrainConfig, split: DigitsSplit, on_epoch: OnEpoch | None = None) -> TrainedModel:
    config.validate()
    report = on_epoch or (lambda _r: None)
    if config.model in SKLEARN_ARCHITECTURES:
        trained = _train_sklearn(config, split, report)
    else:
        trained = _train_torch(config, split, report)
    trained.test_accuracy = float((trained.scores(split.x_test).argmax(1) == split.y_test).mean())
    return trained


def _train_torch(config: TrainConfig, split: DigitsSplit, on_epoch: OnEpoch) -> TrainedModel:
    import torch
    from torch import nn

    from models.nets import TORCH_ARCHITECTURES

    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    model = TORCH_ARCHITECTURES[config.model]()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    order = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * -(-len(x) // config.batch_size)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps) if config.lr_schedule == "cosine" else None
    )
    trained = TrainedModel(config, "pytorch", model)
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for batch in torch.randperm(len(x), generator=order).split(config.batch_size):
            optimiser.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        model.eval()
        val_acc = float((trained.scores(split.x_val).argmax(1) == split.y_val).mean())
        trained.history.append(EpochReport(epoch, total / seen, val_acc))
        on_epoch(trained.history[-1])
    return trained


def _train_sklearn(config: TrainConfig, split: DigitsSplit, on_epoch: OnEpoch) -> TrainedModel:
    from sklearn.linear_model import SGDClassifier
    from sklearn.metrics import log_loss
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(split.x_train)
    classifier = SGDClassifier(loss="log_loss", alpha=1e-3, random_state=config.seed)
    classes = np.arange(10)
    x_train = scaler.transform(split.x_train)
    rng = np.random.default_rng(config.seed)
    pipeline = Pipeline([("scale", scaler), ("classify", classifier)])
    trained = TrainedModel(config, "sklearn", pipeline)
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(x_train))
        classifier.partial_fit(x_train[order], split.y_train[order], classes=classes)
        loss = float(log_loss(split.y_train, classifier.predict_proba(x_train), labels=classes))
        val_acc = float((pipeline.predict(split.x_val) == split.y_val).mean())
        trained.history.append(EpochReport(epoch, loss, val_acc))
        on_epoch(trained.history[-1])
    return trained
