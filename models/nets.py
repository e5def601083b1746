"""PyTorch model definitions. Each takes raw 0-16 pixels, shape (N, 64), and returns logits.

The scaling to 0-1 is the first operation of `forward`, so it is part of the exported
ONNX graph and serving can never skew from training.
"""

from __future__ import annotations

import torch
from torch import nn

PIXEL_MAX = 16.0


class DigitsCNN(nn.Module):
    """The default model: a small CNN (two conv blocks), ~98% test accuracy in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels / PIXEL_MAX).reshape(-1, 1, 8, 8)
        return self.head(self.features(x))


class DigitsHeavy(nn.Module):
    """Same task, deliberately compute-heavy (wide convolutions at full 8x8 resolution):
    about 5 ms per sample at batch 1 on one core, so benchmarks are compute-bound."""

    def __init__(self, width: int = 256, depth: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, 10))
        # He initialisation: with PyTorch's default, eight plain conv+ReLU layers shrink the
        # signal until training sits at chance (seen: 10% after 2 epochs; 52% with this).
        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels / PIXEL_MAX).reshape(-1, 1, 8, 8)
        return self.head(self.features(x))


TORCH_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-heavy": DigitsHeavy,
}
