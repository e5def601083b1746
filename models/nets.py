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
    about 5 ms per sample at batch 1 on one core, so benchmarks are compute-bound.

    Each convolution is followed by batch normalisation: without it eight plain conv+ReLU
    layers learnt slowly and unevenly (73-79% test accuracy after 3 epochs, depending on the
    CPU); with it the network is a real model (95%+) in a few epochs. The export folds every
    normalisation into its convolution (the ONNX graph has Conv + Relu only), so serving cost
    is unchanged."""

    def __init__(self, width: int = 256, depth: int = 7) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for inputs in (1, *[width] * depth):
            layers += [nn.Conv2d(inputs, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels / PIXEL_MAX).reshape(-1, 1, 8, 8)
        return self.head(self.features(x))


TORCH_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "digits-cnn": DigitsCNN,
    "digits-heavy": DigitsHeavy,
}
