"""A Locust load through the stack's nginx as clients see it: V2 REST inference of test digits,
cache off (the model answers every request). Any answer but a 200 with a model version and
an output for the one row is a failure. Run: `locust -f tests/support/router_load.py --host URL`."""

from __future__ import annotations

import random

from locust import FastHttpUser, constant_throughput, task

from models.data import load_split

ROWS = load_split().x_test


class RouterClient(FastHttpUser):
    wait_time = constant_throughput(5)

    @task
    def infer(self) -> None:
        row = ROWS[random.randrange(len(ROWS))].tolist()
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}],
                "parameters": {"cache": False}}  # fmt: skip
        with self.client.post("/v2/models/digits/infer", json=body, name="infer", catch_response=True) as answer:
            if answer.status_code != 200:
                answer.failure(f"HTTP {answer.status_code}")
                return
            doc = answer.json()
            outputs = doc.get("outputs") or [{}]
            if not doc.get("model_version") or outputs[0].get("shape", [0])[0] != 1:
                answer.failure(f"unexpected answer {str(doc)[:120]}")
