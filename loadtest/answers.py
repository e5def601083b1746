"""Is an answer right, and from the right server? The checks every Locust user applies, the
gate's and the load-test locustfile's alike; no Locust here.

Each `judge_*` returns the answer's `Prediction` or raises `WrongAnswer` saying why the
request failed: not a 200, a body that is no valid classification of the one digit sent
(`loadtest.v2codec`), or an answer from another slot or model version than the target names
(`Target.wrong_answerer`).

The BentoML native API (`POST /classify {"pixels": [[64 numbers]]}` ->
`{"model_version", "classes", "confidences"}`, service/app.py) has its codec here too: it
answers with a class and a confidence per row, not a class distribution.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from loadtest.targets import Target
from loadtest.v2codec import N_CLASSES, Prediction, WrongAnswer, from_grpc_answer, from_rest_answer

NATIVE_PATH = "/classify"


def judge_rest(
    status: int,
    body: bytes,
    answered_by: str | None,
    target: Target,
    error: object = None,
    parse: Callable[[bytes], Prediction] = from_rest_answer,
) -> Prediction:
    """A REST answer (status, body, its `X-Canary-Slot`) -> its prediction, or WrongAnswer.
    `error` is the client's transport error, if any (status 0)."""
    if status != 200:
        raise WrongAnswer(f"HTTP {status}" + (f": {error!r}" if error else ""))
    try:
        prediction = parse(body)
    except WrongAnswer as exc:
        raise WrongAnswer(f"wrong answer: {exc}") from None
    if wrong := target.wrong_answerer(answered_by, prediction.model_version):
        raise WrongAnswer(wrong)
    return prediction


def judge_grpc(response: Any, answered_by: str | None, target: Target) -> Prediction:
    """A V2 gRPC answer (and its `x-canary-slot` initial metadata) -> its prediction."""
    try:
        prediction = from_grpc_answer(response)
    except WrongAnswer as exc:
        raise WrongAnswer(f"wrong answer: {exc}") from None
    if wrong := target.wrong_answerer(answered_by, prediction.model_version):
        raise WrongAnswer(wrong)
    return prediction


def to_native_body(row: np.ndarray) -> bytes:
    """One digit for the native API. It has no cache switch: distinct inputs keep the cache
    from answering for the model."""
    pixels = np.asarray(row, dtype=np.float32).reshape(1, -1).tolist()
    return json.dumps({"pixels": pixels}, separators=(",", ":")).encode()


def from_native_answer(body: bytes) -> Prediction:
    """A native `/classify` answer for one row -> its prediction."""
    try:
        payload = json.loads(body)
        classes, confidences = payload["classes"], payload["confidences"]
        version = str(payload.get("model_version") or "")
        if len(classes) != 1 or len(confidences) != 1:
            raise WrongAnswer(f"{len(classes)} classes and {len(confidences)} confidences for one row")
        predicted, confidence = classes[0], float(confidences[0])
    except WrongAnswer:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise WrongAnswer(f"malformed native answer: {exc!r}") from None
    if not version:
        raise WrongAnswer("the answer carries no model version")
    if not isinstance(predicted, int) or isinstance(predicted, bool) or not 0 <= predicted < N_CLASSES:
        raise WrongAnswer(f"class {predicted!r} is not a digit")
    if not (math.isfinite(confidence) and 1 / N_CLASSES - 1e-6 <= confidence <= 1 + 1e-6):
        # the predicted class is the most probable of ten: at least 1/10
        raise WrongAnswer(f"confidence {confidence} is not the top probability of {N_CLASSES} classes")
    return Prediction(predicted, confidence, version)
