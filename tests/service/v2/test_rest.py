"""V2 REST adapter in-process: `V2RestApp` over the tiny core, called through httpx's ASGI
transport (no socket, no BentoML), like the gRPC adapter in test_grpc.py.

Each test asserts what a V2 client sees: the status, the `{"error": ...}` body and the
headers. The same app behind a real `bentoml serve` (and its own uvicorn listener) is
covered by tests/service/test_malformed.py and tests/service/test_dataplane.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from service.core.faults import FaultPlan
from service.core.inference import BatchingConfig, InferenceCore
from service.core.observer import CoreObserver
from service.v2 import SERVER_EXTENSIONS, SERVER_NAME, SERVER_VERSION
from service.v2.rest import HEADER_LENGTH, V2RestApp
from tests.support.tiny_model import digits_rows, tiny_core

pytestmark = pytest.mark.anyio

MAX_ROWS = 64
MAX_BODY = 64 << 10  # 64 KiB: a JSON body of 64 rows fits (~25 KiB), 200 rows do not
INFER = "/v2/models/digits/infer"
ROW = [1.0] * 64


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def core(tmp_path_factory) -> InferenceCore:
    return tiny_core(tmp_path_factory.mktemp("rest-model"), max_rows=MAX_ROWS)


def v2_client(app: V2RestApp, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://v2.test", timeout=20)


@pytest.fixture
async def client(core) -> AsyncIterator[httpx.AsyncClient]:
    async with v2_client(V2RestApp(MAX_BODY, core)) as client:
        yield client


def v2(data: Any = None, shape=(1, 64), datatype="FP32", name="input", **extra) -> bytes:
    tensor = {"name": name, "shape": list(shape), "datatype": datatype, "data": ROW if data is None else data}
    return json.dumps({"inputs": [tensor], **extra}).encode()  # json.dumps writes NaN/Infinity literals


def rows_body(rows: np.ndarray, **extra) -> bytes:
    return v2(rows.ravel().tolist(), rows.shape, **extra)


def binary(header: dict, tail: bytes, declared: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {HEADER_LENGTH: str(len(head) if declared is None else declared)}


def expected_logits(core: InferenceCore, rows: np.ndarray) -> np.ndarray:
    return core.runner.run({"input": rows}, ["logits"])[0]


def assert_error(answer: httpx.Response, status: int, fragment: str) -> str:
    """The error contract: the status, a JSON body that is exactly {"error": <message>}."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(answer.content))
    body = answer.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert fragment in body["error"], body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


# -- health, server and model metadata ------------------------------------------------------


async def test_live_ready_and_server_metadata(client):
    live = await client.get("/v2/health/live")
    assert (live.status_code, live.json()) == (200, {"live": True})
    assert live.headers["content-type"] == "application/json"
    ready = await client.get("/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert (await client.head("/v2/health/ready")).status_code == 200  # HEAD goes where GET goes
    server = (await client.get("/v2")).json()
    assert server == {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(SERVER_EXTENSIONS)}
    assert "binary_tensor_data" in server["extensions"]
    for path in ("/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"):
        answer = await client.get(path)
        assert (answer.status_code, answer.json()) == (200, {"name": "digits", "ready": True})


@pytest.mark.parametrize("path", ["/v2/models/digits", "/v2/models/digits/versions/1"])
async def test_model_metadata_describes_the_card_and_its_lineage(client, core, path):
    answer = await client.get(path)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == "1"
    assert answer.json() == {
        "name": "digits",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        "parameters": {"sha256": core.card.sha256, "run_id": "test-run", "architecture": "tiny"},
    }


# -- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [INFER, "/v2/models/digits/versions/1/infer"])
async def test_json_inference_answers_the_in_process_runner(client, core, path):
    rows = digits_rows(5)
    answer = await client.post(path, content=rows_body(rows, id="req-5"), headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-model-version"] == "1"
    assert HEADER_LENGTH.lower() not in answer.headers
    body = answer.json()
    assert {k: body[k] for k in ("model_name", "model_version", "id")} == {
        "model_name": "digits",
        "model_version": "1",
        "id": "req-5",
    }
    [logits] = body["outputs"]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [5, 10])
    got = np.asarray(logits["data"], dtype=np.float32).reshape(5, 10)
    np.testing.assert_allclose(got, expected_logits(core, rows), rtol=1e-5, atol=1e-5)


async def test_requested_output_by_name_comes_back(client, core):
    rows = digits_rows(2)
    answer = await client.post(INFER, content=rows_body(rows, outputs=[{"name": "logits"}]))
    assert answer.status_code == 200, answer.text
    assert [o["name"] for o in answer.json()["outputs"]] == ["logits"]


@pytest.mark.parametrize(
    ("binary_input", "binary_output"), [(True, True), (True, False), (False, True)], ids=["both", "input", "output"]
)
async def test_binary_tensor_extension_round_trips_with_tritonclients_own_encoding(
    client, core, binary_input, binary_output
):
    """Bodies built and parsed by tritonclient.http itself: JSON header + raw little-endian tail,
    split by Inference-Header-Content-Length, both ways."""
    rows = digits_rows(6, seed=3)
    tensor = triton_http.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary_input)
    wanted = triton_http.InferRequestedOutput("logits", binary_data=binary_output)
    body, json_size = triton_http.InferenceServerClient.generate_request_body([tensor], outputs=[wanted])
    headers = {} if json_size is None else {HEADER_LENGTH: str(json_size)}
    answer = await client.post(INFER, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-model-version"] == "1"
    header_length = answer.headers.get(HEADER_LENGTH.lower())
    if binary_output:
        assert answer.headers["content-type"] == "application/octet-stream"
        assert header_length is not None and len(answer.content) == int(header_length) + 6 * 10 * 4
    else:
        assert answer.headers["content-type"] == "application/json" and header_length is None
    result = triton_http.InferenceServerClient.parse_response_body(
        answer.content, header_length=None if header_length is None else int(header_length)
    )
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("logits"), expected_logits(core, rows), rtol=1e-5, atol=1e-5)


async def test_binary_data_output_parameter_makes_every_output_binary(client, core):
    rows = digits_rows(2)
    answer = await client.post(INFER, content=rows_body(rows, parameters={"binary_data_output": True}))
    assert answer.status_code == 200, answer.text
    split = int(answer.headers[HEADER_LENGTH.lower()])
    header = json.loads(answer.content[:split])
    assert header["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [2, 10], "parameters": {"binary_data_size": 80}}
    ]
    got = np.frombuffer(answer.content[split:], "<f4").reshape(2, 10)
    np.testing.assert_allclose(got, expected_logits(core, rows), rtol=1e-5, atol=1e-5)


# -- client mistakes: status and {"error": ...} ----------------------------------------------


def _binary_head(size: int | None) -> dict:
    tensor: dict[str, Any] = {"name": "input", "shape": [1, 64], "datatype": "FP32"}
    if size is not None:
        tensor["parameters"] = {"binary_data_size": size}
    return {"inputs": [tensor]}


_BIN_HEAD, _ODD_HEAD, _NO_SIZE = _binary_head(256), _binary_head(255), _binary_head(None)
MISTAKES = [
    # 400: the body cannot be read
    ("malformed-json", "POST", INFER, b"{inputs: nope", {}, 400, "malformed JSON body"),
    ("body-not-object", "POST", INFER, b"[1, 2]", {}, 400, "must be a JSON object"),
    ("inputs-missing", "POST", INFER, b"{}", {}, 400, "'inputs' must be a non-empty list"),
    ("id-not-a-string", "POST", INFER, v2(id=7), {}, 400, "'id' must be a string"),
    ("outputs-not-objects", "POST", INFER, v2(outputs=["logits"]), {}, 400, "'outputs' must be a list"),
    ("unknown-datatype", "POST", INFER, v2(datatype="FP128"), {}, 400, "unsupported datatype 'FP128'"),
    ("negative-shape", "POST", INFER, v2(shape=(-1, 64)), {}, 400, "non-negative integers"),
    ("not-numbers", "POST", INFER, v2(data=["a"] * 64), {}, 400, "not a (nested) list of FP32"),
    ("compressed", "POST", INFER, v2(), {"content-encoding": "gzip"}, 400, "compressed request bodies"),
    # 400: the body does not match the model
    ("wrong-input-name", "POST", INFER, v2(name="pixels"), {}, 400, "inputs must be exactly ['input']"),
    ("wrong-dtype", "POST", INFER, v2(data=[1] * 64, datatype="INT64"), {}, 400, "must be FP32, got INT64"),
    ("wrong-shape", "POST", INFER, v2(data=[1.0] * 63, shape=(1, 63)), {}, 400, "must have shape [-1, 64]"),
    ("values-vs-shape", "POST", INFER, v2(data=ROW * 2), {}, 400, "128 values, shape [1, 64] needs 64"),
    ("empty-batch", "POST", INFER, v2(data=[], shape=(0, 64)), {}, 400, "empty batch"),
    ("nan", "POST", INFER, v2(data=[float("nan")] + ROW[1:]), {}, 400, "NaN and Infinity are not JSON numbers"),
    ("inf", "POST", INFER, v2(data=[float("-inf")] + ROW[1:]), {}, 400, "NaN and Infinity are not JSON numbers"),
    ("pixel-above-16", "POST", INFER, v2(data=[17.0] + ROW[1:]), {}, 400, "must lie in [0, 16]"),
    ("pixel-below-0", "POST", INFER, v2(data=[-0.5] + ROW[1:]), {}, 400, "must lie in [0, 16]"),
    ("unknown-output", "POST", INFER, v2(outputs=[{"name": "nope"}]), {}, 400, "unknown output(s) ['nope']"),
    # 400: hostile bodies (each once answered 500 with a traceback)
    ("deep-nesting", "POST", INFER, b"[" * 5000, {}, 400, "malformed JSON body"),
    ("deep-data", "POST", INFER, v2(data=json.loads("[" * 500 + "]" * 500)), {}, 400, "not a (nested) list of FP32"),
    ("output-parameters-not-object", "POST", INFER, v2(outputs=[{"name": "logits", "parameters": 1}]), {}, 400,
     "outputs[0] (logits): 'parameters' must be an object"),
    ("datatype-not-a-string", "POST", INFER, v2(datatype=["FP32"]), {}, 400, "unsupported datatype"),
    ("data-longer-than-shape", "POST", INFER, v2(data=[ROW] * 3), {}, 400, "'data' holds 3 rows, shape [1, 64]"),
    ("nan-in-a-row", "POST", INFER, v2(data=[[float("nan")] + ROW[1:]]), {}, 400, "NaN and Infinity"),
    ("header-length-5000-digits", "POST", INFER, v2(), {HEADER_LENGTH: "9" * 5000}, 400,
     "Inference-Header-Content-Length '999"),
    ("header-length-superscript", "POST", INFER, v2(), {HEADER_LENGTH: "²".encode("latin-1")}, 400,
     "must be a byte count within"),
    # 400: the binary tensor extension misused
    ("binary-header-past-body", "POST", INFER, *binary(_BIN_HEAD, b"\0" * 256, declared=10_000), 400,
     "must be a byte count within"),
    ("binary-header-not-a-number", "POST", INFER, *binary(_BIN_HEAD, b"\0" * 256, declared=-1), 400,
     "Inference-Header-Content-Length '-1'"),
    ("binary-size-without-header", "POST", INFER, json.dumps(_BIN_HEAD).encode(), {}, 400,
     "has no Inference-Header-Content-Length"),
    ("binary-data-missing", "POST", INFER, *binary(_NO_SIZE, b"\0" * 256), 400, "'data' is missing"),
    ("binary-too-short", "POST", INFER, *binary(_BIN_HEAD, b"\0" * 100), 400, "runs past the end of the body"),
    ("binary-extra-bytes", "POST", INFER, *binary(_BIN_HEAD, b"\0" * 300), 400, "44 bytes of binary data"),
    ("binary-partial-value", "POST", INFER, *binary(_ODD_HEAD, b"\0" * 255), 400, "not a whole number of FP32"),
    # 404: no such model, version or route
    ("infer-unknown-model", "POST", "/v2/models/nope/infer", v2(), {}, 404, "unknown model 'nope'"),
    ("infer-unknown-version", "POST", "/v2/models/digits/versions/9/infer", v2(), {}, 404, "unknown version '9'"),
    ("metadata-unknown-model", "GET", "/v2/models/nope", b"", {}, 404, "unknown model 'nope'"),
    ("metadata-unknown-version", "GET", "/v2/models/digits/versions/9", b"", {}, 404, "unknown version '9'"),
    ("ready-unknown-version", "GET", "/v2/models/digits/versions/9/ready", b"", {}, 404, "unknown version '9'"),
    ("unknown-health-route", "GET", "/v2/health/nope", b"", {}, 404, "no V2 route /v2/health/nope"),
    ("unknown-route", "GET", "/v2/repository/index", b"", {}, 404, "no V2 route /v2/repository/index"),
    ("outside-v2", "GET", "/metrics", b"", {}, 404, "no V2 route /metrics"),
    # 413: too much
    ("too-many-rows", "POST", INFER, v2(data=ROW * 65, shape=(65, 64)), {}, 413,
     "shape [65, 64] holds 4160 values; one input may carry at most 4096"),
    ("huge-shape-tiny-data", "POST", INFER, v2(shape=(10**15, 64)), {}, 413, "holds 64" + "0" * 15 + " values"),
    ("body-too-large", "POST", INFER, b" " * (MAX_BODY + 1), {}, 413,
     f"request body of {MAX_BODY + 1} bytes exceeds the {MAX_BODY}-byte limit"),
    # 405: the wrong method for the route
    ("get-infer", "GET", INFER, b"", {}, 405, "method GET is not allowed here; use POST"),
    ("put-infer", "PUT", INFER, v2(), {}, 405, "method PUT is not allowed here; use POST"),
    ("post-ready", "POST", "/v2/health/ready", b"", {}, 405, "method POST is not allowed here; use GET"),
    ("post-live", "POST", "/v2/health/live", b"", {}, 405, "use GET"),
    ("delete-model", "DELETE", "/v2/models/digits", b"", {}, 405, "method DELETE is not allowed here; use GET"),
    ("post-model-ready", "POST", "/v2/models/digits/ready", b"", {}, 405, "use GET"),
    ("post-server", "POST", "/v2", b"", {}, 405, "use GET"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "headers", "status", "fragment"), MISTAKES, ids=[m[0] for m in MISTAKES]
)
async def test_client_mistakes_get_their_status_and_a_json_error(
    client, core, case, method, path, body, headers, status, fragment
):
    answer = await client.request(method, path, content=body, headers=headers)
    assert_error(answer, status, fragment)
    assert "retry-after" not in answer.headers  # only 503 says "retry"
    rows = digits_rows(1)
    after = await client.post(INFER, content=rows_body(rows))  # and the app still answers
    assert after.status_code == 200, after.text


async def test_a_body_streamed_past_the_limit_is_refused_without_a_content_length(core):
    """Chunked, no Content-Length: the limit holds while reading, not only on the header."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):  # 128 KiB in 16 KiB chunks
            yield b" " * (16 << 10)

    async with v2_client(V2RestApp(MAX_BODY, core)) as client:
        answer = await client.post(INFER, content=chunks())
    assert "content-length" not in answer.request.headers
    assert_error(answer, 413, f"request body exceeds the {MAX_BODY}-byte limit")


# -- 503: not loaded, not ready, overloaded --------------------------------------------------


async def test_before_the_core_is_bound_only_live_answers():
    """The Bento mounts the app before its core is loaded: live, but not ready, and every
    model route is a 503 with Retry-After, so a router or client tries again later."""
    app = V2RestApp(MAX_BODY)
    async with v2_client(app) as client:
        assert (await client.get("/v2/health/live")).json() == {"live": True}
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        for method, path, body in (
            ("POST", INFER, v2()),
            ("GET", "/v2/models/digits", b""),
            ("GET", "/v2/models/digits/ready", b""),
        ):
            answer = await client.request(method, path, content=body)
            assert_error(answer, 503, "the model is still loading")
            assert answer.headers["retry-after"] == "1"


async def test_a_core_that_is_not_ready_refuses_inference_with_retry_after(tmp_path):
    cold = tiny_core(tmp_path, max_rows=MAX_ROWS, start=False)
    async with v2_client(V2RestApp(MAX_BODY, cold)) as client:
        ready = await client.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (503, {"ready": False})
        model_ready = await client.get("/v2/models/digits/ready")
        assert (model_ready.status_code, model_ready.json()) == (503, {"name": "digits", "ready": False})
        assert (await client.get("/v2/models/digits")).status_code == 200  # metadata needs no warm model
        answer = await client.post(INFER, content=v2())
        assert_error(answer, 503, "model is not ready yet")
        assert answer.headers["retry-after"] == "1"
        cold.start()
        assert (await client.post(INFER, content=v2())).status_code == 200
        await cold.close()  # shutting down: not ready again
        assert_error(await client.post(INFER, content=v2()), 503, "not ready")


async def test_overload_is_a_503_with_retry_after_not_a_wait(tmp_path):
    """More rows than the queue holds are shed at once, with Retry-After, and counted."""
    rejected: list[int] = []

    class Counting(CoreObserver):
        def rejected(self) -> None:
            rejected.append(1)

    small = tiny_core(tmp_path, max_rows=MAX_ROWS, batching=BatchingConfig(max_queue_rows=4), observer=Counting())
    async with v2_client(V2RestApp(MAX_BODY, small)) as client:
        answer = await client.post(INFER, content=rows_body(digits_rows(8)))
        assert_error(answer, 503, "server is overloaded: 0 rows queued, limit 4")
        assert answer.headers["retry-after"] == "1"
        assert rejected == [1]
        assert (await client.post(INFER, content=rows_body(digits_rows(4)))).status_code == 200
    await small.close()


# -- 500: faults and bugs ----------------------------------------------------------------------


async def test_an_injected_fault_is_a_500_with_its_message(tmp_path):
    faulty = tiny_core(tmp_path, max_rows=MAX_ROWS, faults=FaultPlan(error_ratio=0.5))
    async with v2_client(V2RestApp(MAX_BODY, faulty)) as client:
        statuses = []
        for _ in range(4):
            answer = await client.post(INFER, content=v2())
            statuses.append(answer.status_code)
            if answer.status_code == 500:
                assert_error(answer, 500, "injected fault")
                assert "retry-after" not in answer.headers
    assert statuses == [200, 500, 200, 500]


async def test_an_unexpected_error_is_a_500_that_hides_its_internals(core):
    class BrokenCore:
        card, ready, observer = core.card, True, CoreObserver()

        def check_model(self, name, version=None):
            pass

        async def infer(self, request, trace=None):
            raise RuntimeError("secret /etc/model-path")

    async with v2_client(V2RestApp(MAX_BODY, BrokenCore())) as client:  # type: ignore[arg-type]
        answer = await client.post(INFER, content=v2())
    assert answer.json() == {"error": "internal error"}
    assert answer.status_code == 500 and "secret" not in answer.text


# -- what the adapter reports, and where it is mounted -----------------------------------------


async def test_every_inference_request_is_observed_with_the_status_the_client_got(tmp_path):
    seen: list[tuple[str, str]] = []

    class Recording(CoreObserver):
        def request(self, protocol: str, status: str, seconds: float) -> None:
            assert seconds >= 0
            seen.append((protocol, status))

    observed = tiny_core(tmp_path, max_rows=MAX_ROWS, observer=Recording())
    async with v2_client(V2RestApp(MAX_BODY, observed)) as client:
        await client.post(INFER, content=v2())
        await client.post(INFER, content=b"{nope")
        await client.post("/v2/models/nope/infer", content=v2())
        await client.post(INFER, content=v2(data=ROW * 65, shape=(65, 64)))
        await client.get("/v2/models/digits")  # metadata and health are not inference requests
        await client.get("/v2/health/ready")
    assert seen == [("rest", "200"), ("rest", "400"), ("rest", "404"), ("rest", "413")]


async def test_routes_are_read_below_the_mount_point(core):
    """Mounted under a prefix (Starlette sets root_path), the app routes the rest of the path."""
    async with v2_client(V2RestApp(MAX_BODY, core), root_path="/mounted") as client:
        assert (await client.get("/mounted/v2/health/ready")).json() == {"ready": True}
        answer = await client.post("/mounted/v2/models/digits/infer", content=v2())
        assert answer.status_code == 200 and answer.json()["model_version"] == "1"
