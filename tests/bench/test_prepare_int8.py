"""Issue 16: an int8 export refused by its accuracy check is a finding of the benchmark, not
the end of the model's section: the fp32 model is kept, the refusal is reported and the
int8 contender says why it has no row."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import prepare
from bench.contenders import SkipContender, build_contenders
from bench.prepare import PreparedModel
from models.quantize import QuantizationRefused

FP32 = PreparedModel("digits-heavy", 3, "models:/digits/3", "digits:v3", "digits-service:v3", Path("m.onnx"), "ab")


def int8_fails_with(monkeypatch, error: Exception) -> None:
    """prepare_one stand-in: the fp32 model prepares, the int8 export raises `error`."""

    def prepare_one(home, architecture, epochs, fresh, say, precision="fp32", **recipe):
        if precision == "int8":
            raise error
        return FP32

    monkeypatch.setattr(prepare, "prepare_one", prepare_one)


def test_a_refused_int8_export_keeps_the_fp32_model_and_says_why(monkeypatch):
    int8_fails_with(monkeypatch, QuantizationRefused("int8 lost 0.56 points of test accuracy (limit 0.5)"))
    said: list[str] = []
    model = prepare.prepare_model(None, "digits-heavy", 3, False, said.append, int8=True)
    assert model.int8 is None and model.version == 3 and "lost 0.56 points" in model.int8_refused
    assert said == ["int8 export refused: int8 lost 0.56 points of test accuracy (limit 0.5)"]
    (int8,) = [c for c in build_contenders(("bento-int8",))]
    with pytest.raises(SkipContender, match="its int8 export was refused: int8 lost 0.56 points"):
        with int8.serve(model, None):
            pass


def test_other_failures_of_the_int8_path_still_fail(monkeypatch):
    int8_fails_with(monkeypatch, RuntimeError("training crashed"))
    with pytest.raises(RuntimeError, match="training crashed"):
        prepare.prepare_model(None, "digits-heavy", 3, False, print, int8=True)


def test_a_refused_int8_export_is_a_row_of_the_table_with_its_reason():
    from bench.report import markdown_table

    refused = [{"model": "digits-heavy", "label": "bento-canary, int8 export", "reason": "int8 lost 0.56 points"}]
    text = markdown_table([], {}, refused)
    assert "### digits-heavy" in text
    assert "| **bento-canary, int8 export** | - | refused |" in text
    assert "bento-canary, int8 export: refused, int8 lost 0.56 points" in text
