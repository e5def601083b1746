"""LitServe for the benchmark: a `LitAPI` that speaks V2-shaped JSON and batches with ORT.

Runs inside LitServe's own venv (`bench/peers.py`), so it imports nothing from this project:
`python litserve_app.py --onnx PATH --port N --max-batch-size 64 --batch-timeout 0.002`.
The request is the body `bench.payloads.to_v2_json` builds (`{"inputs": [{"name", "shape",
"datatype": "FP32", "data"}]}`), POSTed to `/v2/models/digits/infer`; the answer is V2-shaped
too (`{"model_name", "outputs": [{"name": "logits", "shape", "datatype": "FP32", "data"}]}`).
LitServe's batcher hands `batch` up to `max_batch_size` decoded requests (each [n, 64]);
they are concatenated for one `session.run` and the logits split back per request. No
gRPC: LitServe serves HTTP only. `decode_v2`, `stack`, `split` and `encode_v2` are plain
functions (the tests import this module without LitServe installed; the LitAPI class is
only defined where `litserve` imports).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

MODEL_NAME = "digits"
API_PATH = f"/v2/models/{MODEL_NAME}/infer"


def decode_v2(request: dict[str, Any]) -> np.ndarray:
    """The first input of a V2 JSON request as FP32 [n, 64] (a flat or nested `data`)."""
    tensor = request["inputs"][0]
    if tensor.get("datatype", "FP32") != "FP32":
        raise ValueError(f"expected FP32, got {tensor.get('datatype')}")
    return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])


def stack(inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Many requests' rows as one array, with each request's row count."""
    return np.concatenate(inputs, axis=0), [len(x) for x in inputs]


def split(logits: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """One batch's logits back into each request's rows."""
    return np.split(logits, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [logits]


def encode_v2(logits: np.ndarray, output_name: str = "logits", model_name: str = MODEL_NAME) -> dict[str, Any]:
    """A V2 JSON response with one FP32 output."""
    return {
        "model_name": model_name,
        "outputs": [
            {"name": output_name, "shape": list(logits.shape), "datatype": "FP32", "data": logits.reshape(-1).tolist()}
        ],
    }


try:
    import litserve as ls
except ImportError:  # this project's venv (the tests) has no LitServe: the functions above still import
    ls = None

if ls is not None:

    class OrtDigitsAPI(ls.LitAPI):
        """One ORT session (default options, CPU) per inference worker. A module-level class:
        LitServe pickles the API into its inference worker process (spawn)."""

        def __init__(self, onnx_path: str, max_batch_size: int, batch_timeout: float) -> None:
            super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH)
            self.onnx_path = onnx_path

        def setup(self, device: str) -> None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.output_name = self.session.get_outputs()[0].name

        def decode_request(self, request: dict, **kwargs: Any) -> np.ndarray:
            return decode_v2(request)

        def batch(self, inputs: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
            return stack(inputs)

        def predict(self, x: Any, **kwargs: Any) -> Any:
            if isinstance(x, np.ndarray):  # max_batch_size 1: LitServe calls no batch()
                return self.session.run([self.output_name], {self.input_name: x})[0]
            rows, sizes = x
            return split(self.session.run([self.output_name], {self.input_name: rows})[0], sizes)

        def unbatch(self, output: list[np.ndarray]) -> list[np.ndarray]:
            return output

        def encode_response(self, output: np.ndarray, **kwargs: Any) -> dict[str, Any]:
            return encode_v2(output, self.output_name)


def main() -> None:
    if ls is None:
        raise SystemExit("litserve is not installed in this interpreter's environment")
    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.002)
    args = parser.parse_args()
    api = OrtDigitsAPI(args.onnx, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    # no client.py written to the working folder; no uvicorn access log line per request
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, access_log=False)


if __name__ == "__main__":
    main()
