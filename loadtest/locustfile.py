"""Traffic for the model service: `locust -f loadtest/locustfile.py --host http://127.0.0.1:8080`.

Every request is a distinct digit (one of scikit-learn's bundled 1,797 plus a little noise)
sent over V2 REST JSON with the response cache off, so ONNX Runtime runs on every request: a
load test whose requests all hit the cache proves nothing about the model. No client retries.
An answer counts as a failure unless it is a 200 with 10 class scores and a model version.
Each request is named after the slot that answered (`X-Canary-Slot`), so Locust's tables and
charts split the traffic by slot: "infer blue", "infer green".

Used by the release tests and `make chaos`.
"""

from __future__ import annotations

import numpy as np
from locust import FastHttpUser, constant, task
from sklearn.datasets import load_digits

DIGITS = load_digits().data.astype(np.float32)


class V2RestJsonUser(FastHttpUser):
    """One digit per request, paced at most 200 requests/s per user."""

    wait_time = constant(0.005)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()

    @task
    def infer(self) -> None:
        row = DIGITS[self.rng.integers(len(DIGITS))]
        # lower the lit pixels a little: a new input each time, still in the model's 0-16 range
        row = np.where(row > 0, row - self.rng.uniform(0, 0.5, 64), row).astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}],
                "parameters": {"cache": False}}  # fmt: skip
        with self.client.post("/v2/models/digits/infer", json=body, catch_response=True, name="infer") as answer:
            answer.request_meta["name"] = f"infer {answer.headers.get('x-canary-slot') or '?'}"
            if answer.status_code != 200:
                answer.failure(f"HTTP {answer.status_code}")
                return
            try:
                payload = answer.json()
                scores = [o for o in payload["outputs"] if o["name"] in ("logits", "probabilities")]
                good = len(scores) == 1 and len(scores[0]["data"]) == 10 and payload.get("model_version")
            except (ValueError, KeyError, TypeError):
                good = False
            if not good:
                answer.failure("wrong body")
