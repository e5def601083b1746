"""int8 quantisation of an exported ONNX graph, with its own accuracy check.

`canary export --quantize int8` runs this after the fp32 graph passed its parity check:
ONNX Runtime's static QDQ quantisation (int8 weights, uint8 activations, per-channel
weights), calibrated on digits from the training split, then refused unless the int8
graph's test accuracy is at most `max_drop_pp` percentage points (0.5) below the fp32
graph's on the same test split.

Static, not dynamic: dynamic quantisation turns convolutions into ConvInteger, which ONNX
Runtime runs far slower than fp32 on CPU (measured on digits-cnn: 5,800 vs 35,500 samples/s
at batch 1), while static QDQ keeps int8 kernels end to end (digits-heavy: about 10x
the fp32 throughput on this project's machines, see the README's benchmark).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import QuantizationRefused
from models.export import GraphContract

MAX_DROP_PP = 0.5
CALIBRATION_ROWS = 256
PRECISIONS = ("fp32", "int8")


@dataclass(frozen=True)
class QuantReport:
    fp32_accuracy: float
    int8_accuracy: float
    argmax_agreement: float  # share of test digits where both graphs predict the same class
    samples: int

    @property
    def drop_pp(self) -> float:
        return 100 * (self.fp32_accuracy - self.int8_accuracy)

    def as_tags(self) -> dict[str, str]:
        return {
            "precision": "int8",
            "fp32_test_accuracy": f"{self.fp32_accuracy:.6f}",
            "int8_test_accuracy": f"{self.int8_accuracy:.6f}",
            "int8_accuracy_drop_pp": f"{self.drop_pp:.3f}",
            "int8_argmax_agreement": f"{self.argmax_agreement:.6f}",
        }


def quantize_int8(fp32: Path, target: Path, contract: GraphContract, calibration: np.ndarray) -> None:
    """Write the static-QDQ int8 version of `fp32` to `target`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rows = np.ascontiguousarray(calibration[:CALIBRATION_ROWS], dtype=np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{contract.input_name: rows[i : i + 32]} for i in range(0, len(rows), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    # The exporter's recorded intermediate shapes can disagree with ONNX shape inference
    # (seen: dimension 0 of a Gemm); the quantiser re-infers them, so drop them first.
    model = onnx.load(str(fp32))
    del model.graph.value_info[:]
    plain = target.with_suffix(".fp32-plain.onnx")
    onnx.save(model, str(plain))
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantiser's "consider pre-processing" advice on every call
    try:
        quantize_static(
            str(plain), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    finally:
        quiet.setLevel(level)
        plain.unlink(missing_ok=True)
    onnx.checker.check_model(str(target))


def _predict(path: Path, contract: GraphContract, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = session.run([contract.scores_output], {contract.input_name: x.astype(np.float32)})[0]
    return np.asarray(scores).argmax(axis=1)


def check_quantized(
    fp32: Path, int8: Path, contract: GraphContract, x_test: np.ndarray, y_test: np.ndarray,
    max_drop_pp: float = MAX_DROP_PP,
) -> QuantReport:  # fmt: skip
    """Both graphs on the whole test split; `QuantizationRefused` if int8 loses too much."""
    before, after = _predict(fp32, contract, x_test), _predict(int8, contract, x_test)
    report = QuantReport(
        float((before == y_test).mean()), float((after == y_test).mean()), float((before == after).mean()), len(y_test)
    )
    if report.drop_pp > max_drop_pp:
        raise QuantizationRefused(
            f"int8 loses {report.drop_pp:.2f} points of test accuracy ({report.fp32_accuracy:.2%} -> "
            f"{report.int8_accuracy:.2%}; limit {max_drop_pp:g}): refused, nothing was written; export without --quantize"
        )
    return report
