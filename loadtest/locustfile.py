"""Locust load for the zero-loss release test: plain HttpUser POSTs, no client retries;
a 200 whose body holds no 10-class scores counts as a failure too."""

from __future__ import annotations

from locust import HttpUser, constant, task

ROW = [float(v) for v in [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
                          0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]]  # fmt: skip
BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ROW}]}


class Inference(HttpUser):
    wait_time = constant(0.005)

    @task
    def infer(self) -> None:
        with self.client.post("/v2/models/digits/infer", json=BODY, catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"HTTP {answer.status_code}")
                return
            scores = [o for o in answer.json()["outputs"] if o["name"] in ("logits", "probabilities")]
            if len(scores) != 1 or len(scores[0]["data"]) != 10:
                answer.failure("wrong body")
