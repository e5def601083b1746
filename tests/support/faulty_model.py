"""A model that behaves differently while being exported to ONNX (as some real models do,
e.g. with export-only code paths): the exporter must catch it with its parity check."""

from __future__ import annotations

import torch

from models.nets import DigitsCNN


class ExportSkewedCNN(DigitsCNN):
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = super().forward(pixels)
        if torch.onnx.is_in_onnx_export():
            return logits + 0.01  # shifts every logit in the ONNX graph only
        return logits
