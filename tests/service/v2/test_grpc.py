"""V2 gRPC adapter: a real server on a free port, driven by the real `tritonclient.grpc`.

The server runs in a background thread with its own event loop, as it will inside the
BentoML worker's loop. Requests tritonclient cannot produce go through the raw stub.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb2
from tritonclient.grpc import service_pb2_grpc as pb2_grpc
from tritonclient.utils import InferenceServerException

from service.core.errors import InvalidInput
from service.core.tensors import V2_TO_NUMPY
from service.v2.grpc_codec import from_model_infer_request
from service.v2.grpc_server import GrpcEndpoint, start_grpc_server
from tests.support.tiny_model import digits_rows, tiny_core
from tests.support.v2_listener import cancel_leftovers

MAX_ROWS = 64
MAX_MESSAGE_BYTES = 256 << 10  # 1100 rows of 64 FP32 (281,600 bytes) exceed it
TIMEOUT = 20.0


@dataclasses.dataclass
class Served:
    endpoint: GrpcEndpoint
    loop: asyncio.AbstractEventLoop
    url: str

    def run(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop, from the test thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)


TRANSPORT = {"name": "lean"}  # the server every test of this module runs on (see `transport`)


@pytest.fixture(scope="module", params=["grpcio", "lean"], autouse=True)
def transport(request) -> Iterator[str]:
    """Both gRPC servers the Bento can run (CANARY_SERVICE_GRPC_TRANSPORT) answer this whole
    module: same codes, metadata, limits and health."""
    TRANSPORT["name"] = request.param
    yield request.param
    TRANSPORT["name"] = "lean"


@contextlib.contextmanager
def serving(
    core_provider: Callable[[], Any], port: int = 0, max_concurrent_rpcs: int | None = 1024,
    transport: str | None = None, loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
) -> Iterator[Served]:  # fmt: skip
    transport = transport or TRANSPORT["name"]
    loop = loop_factory()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-loop", daemon=True)
    thread.start()
    try:
        start = start_grpc_server(
            core_provider, "127.0.0.1", port, MAX_MESSAGE_BYTES, max_concurrent_rpcs, transport=transport
        )
        endpoint = asyncio.run_coroutine_threadsafe(start, loop).result(TIMEOUT)
        served = Served(endpoint, loop, f"127.0.0.1:{endpoint.port}")
        try:
            with grpc.insecure_channel(served.url) as channel:  # waits with a deadline, no sleep
                grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
            yield served
        finally:
            served.run(endpoint.stop(0))
            served.run(cancel_leftovers())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return tiny_core(tmp_path_factory.mktemp("grpc-model"), max_rows=MAX_ROWS)


@pytest.fixture(scope="module")
def served(core) -> Iterator[Served]:
    with serving(lambda: core) as running:
        yield running


@pytest.fixture(scope="module")
def client(served) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(served.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(served) -> Iterator[pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served.url) as channel:
        yield pb2_grpc.GRPCInferenceServiceStub(channel)


def tin(rows: np.ndarray, name: str = "input", datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return tensor


def raw_request(rows: np.ndarray) -> pb2.ModelInferRequest:
    request = pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request


def health_status(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT).status


def assert_answers(client: triton.InferenceServerClient, core, n: int = 3) -> None:
    rows = digits_rows(n, seed=n)
    got = client.infer("digits", [tin(rows)], client_timeout=TIMEOUT).as_numpy("logits")
    assert got is not None and got.shape == (n, 10)
    np.testing.assert_allclose(got, core.runner.run({"input": rows}, ["logits"])[0], rtol=1e-5, atol=1e-5)


def test_live_ready_and_model_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")


def test_metadata_describes_server_and_model(client):
    assert client.get_server_metadata().name == "bento-canary"
    for version in ("", "1"):
        meta = client.get_model_metadata("digits", version)
        assert (meta.name, list(meta.versions), meta.platform) == ("digits", ["1"], "onnxruntime_onnx")
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 64])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]


@pytest.mark.parametrize("call", [
    pytest.param(lambda c: c.get_model_metadata("nope"), id="metadata-unknown-model"),
    pytest.param(lambda c: c.get_model_metadata("digits", "9"), id="metadata-unknown-version"),
    pytest.param(lambda c: c.is_model_ready("digits", "9"), id="ready-unknown-version"),
])  # fmt: skip
def test_unknown_model_or_version_is_not_found(client, call):
    with pytest.raises(InferenceServerException) as info:
        call(client)
    assert info.value.status() == "StatusCode.NOT_FOUND"


def test_inference_equals_the_in_process_runner(client, core):
    rows = digits_rows(7)
    result = client.infer("digits", [tin(rows)], request_id="req-7", client_timeout=TIMEOUT)
    expected = core.runner.run({"input": rows}, ["logits"])[0]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert result.get_response().id == "req-7"


def test_typed_contents_answer_like_raw(stub, core):
    rows = digits_rows(4)
    request = pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[4, 64]).contents.fp32_contents.extend(rows.ravel())
    response = stub.ModelInfer(request, timeout=TIMEOUT)
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(4, 10)
    np.testing.assert_allclose(got, core.runner.run({"input": rows}, ["logits"])[0], rtol=1e-5, atol=1e-5)


def test_model_version_is_visible(client, stub):
    result = client.infer("digits", [tin(digits_rows(1))], client_timeout=TIMEOUT)
    assert result.get_response().model_version == "1"
    _, call = stub.ModelInfer.with_call(raw_request(digits_rows(1)), timeout=TIMEOUT)
    assert ("x-model-version", "1") in tuple(call.trailing_metadata())


def test_the_request_id_is_kept_when_sane_made_when_missing_and_sent_back_in_trailers(stub):
    def call(metadata=(), **fields):
        request = raw_request(digits_rows(1))
        for key, value in fields.items():
            setattr(request, key, value)
        response, done = stub.ModelInfer.with_call(request, metadata=metadata, timeout=TIMEOUT)
        return response, dict(done.trailing_metadata())

    made, trailers = call()
    assert re.fullmatch(r"[0-9a-f]{32}", trailers["x-request-id"]) and made.id == trailers["x-request-id"]
    kept, trailers = call((("x-request-id", "order-17"),))
    assert kept.id == trailers["x-request-id"] == "order-17"
    replaced, trailers = call((("x-request-id", "no spaces allowed"),))
    assert re.fullmatch(r"[0-9a-f]{32}", trailers["x-request-id"])
    own, trailers = call((("x-request-id", "rid-9"),), id="clients-own-id")
    assert own.id == "clients-own-id" and trailers["x-request-id"] == "rid-9"
    with pytest.raises(grpc.RpcError) as refused:  # an error's status carries it too
        stub.ModelInfer(pb2.ModelInferRequest(model_name="digits"), metadata=(("x-request-id", "rid-10"),),
                        timeout=TIMEOUT)  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "rid-10") in tuple(refused.value.trailing_metadata())


def test_requested_outputs_come_back_alone_and_in_order(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from service.core.inference import InferenceCore
    from service.core.runner import OnnxRunner, file_sha256
    from service.core.tensors import TensorSpec
    from tests.support.tiny_model import tiny_card, write_tiny_onnx

    path = tmp_path / "two-outputs.onnx"
    write_tiny_onnx(path)
    model = onnx.load(path)
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    model.graph.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]))
    path.write_bytes(model.SerializeToString())
    card = tiny_card(file_sha256(path))
    card = dataclasses.replace(card, outputs=(*card.outputs, TensorSpec("probabilities", "FP32", (-1, 10))))
    two = InferenceCore(OnnxRunner(path, card, intra_op_threads=1), MAX_ROWS)
    two.start()
    rows = digits_rows(5)
    logits, probabilities = two.runner.run({"input": rows}, ["logits", "probabilities"])
    with serving(lambda: two) as running:
        client = triton.InferenceServerClient(running.url)
        only = client.infer("digits", [tin(rows)], outputs=[triton.InferRequestedOutput("probabilities")])
        assert [o.name for o in only.get_response().outputs] == ["probabilities"]
        assert only.as_numpy("logits") is None
        np.testing.assert_allclose(only.as_numpy("probabilities"), probabilities, rtol=1e-5, atol=1e-6)
        # Reversed order: raw_output_contents must follow the outputs, not the card.
        wanted = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("logits")]
        both = client.infer("digits", [tin(rows)], outputs=wanted)
        np.testing.assert_allclose(both.as_numpy("probabilities"), probabilities, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(both.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
        client.close()


def via_triton(build: Callable[[], dict]) -> Callable:
    def send(client, stub) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as info:
            client.infer(**{"model_name": "digits", "client_timeout": TIMEOUT, **build()})
        return info.value.status(), info.value.message()

    return send


def via_raw(build: Callable[[pb2.ModelInferRequest], None]) -> Callable:
    def send(client, stub) -> tuple[str, str]:
        request = raw_request(digits_rows(2))
        build(request)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=TIMEOUT)
        return str(info.value.code()), info.value.details()

    return send


def _nan_rows() -> np.ndarray:
    rows = digits_rows(2)
    rows[1, 5] = np.nan
    return rows


BAD = "INVALID_ARGUMENT"
BAD_REQUESTS = [
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2), name="pixels")]}), BAD, "pixels", id="input-name"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2).astype(np.float64), datatype="FP64")]}), BAD, "FP64", id="datatype"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2)[:, :63].copy())]}), BAD, "shape", id="shape"),
    pytest.param(via_triton(lambda: {"inputs": [tin(_nan_rows())]}), BAD, "NaN", id="nan"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2) + 17)]}), BAD, "input", id="out-of-range"),
    pytest.param(via_triton(lambda: {"inputs": [tin(np.full((2, 64), b"1", dtype=object), datatype="BYTES")]}), BAD, "BYTES", id="bytes"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2))], "outputs": [triton.InferRequestedOutput("nope")]}), BAD, "nope", id="unknown-output"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2))], "model_name": "nope"}), "NOT_FOUND", "nope", id="unknown-model"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(2))], "model_version": "9"}), "NOT_FOUND", "'9'", id="unknown-version"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(MAX_ROWS + 1))]}), "RESOURCE_EXHAUSTED", str(MAX_ROWS + 1), id="too-many-rows"),
    pytest.param(via_triton(lambda: {"inputs": [tin(digits_rows(1100))]}), "RESOURCE_EXHAUSTED", "larger than max", id="message-too-large"),
    pytest.param(via_raw(lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-4])), BAD, "508 bytes", id="raw-byte-length"),
    pytest.param(via_raw(lambda r: r.raw_input_contents.append(b"")), BAD, "2 entries", id="raw-entry-count"),
    pytest.param(via_raw(lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 128)), BAD, "mixed", id="raw-and-typed"),
    pytest.param(via_raw(lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].contents.fp32_contents.extend([0.0] * 127))), BAD, "127 values", id="typed-count"),
    pytest.param(via_raw(lambda r: (r.ClearField("raw_input_contents"), r.inputs[0].contents.int64_contents.extend([0] * 128))), BAD, "int64_contents", id="typed-wrong-field"),
    pytest.param(via_raw(lambda r: r.inputs[0].shape.__setitem__(0, -2)), BAD, "negative", id="negative-dim"),
    pytest.param(via_raw(lambda r: setattr(r.inputs[0], "datatype", "FLOAT")), BAD, "FLOAT", id="unknown-datatype"),
    pytest.param(via_raw(lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents"))), BAD, "no inputs", id="no-inputs"),
]  # fmt: skip


@pytest.mark.parametrize(("send", "code", "detail"), BAD_REQUESTS)
def test_bad_request_is_refused_with_its_code(client, stub, core, send, code, detail):
    status, message = send(client, stub)
    assert (status, detail in message) == (f"StatusCode.{code}", True), message
    assert_answers(client, core)  # and the server still answers correctly afterwards


def test_unexpected_error_is_internal_without_details(core):
    class BrokenCore:
        card, ready = core.card, True

        def check_model(self, name, version=None):
            pass

        async def infer(self, request, trace=None):
            raise RuntimeError("secret /etc/model-path")

    with serving(lambda: BrokenCore()) as running, grpc.insecure_channel(running.url) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_request(digits_rows(1)), timeout=TIMEOUT)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error")


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(core):
    """With 2 calls in flight allowed and the model held up, a third concurrent call is
    refused RESOURCE_EXHAUSTED instead of queueing without bound; the first two are answered."""
    import threading

    release = threading.Event()

    class HeldCore:
        card, ready, max_input_elements = core.card, True, core.max_input_elements

        def check_model(self, name, version=None):
            pass

        async def infer(self, request, trace=None):
            await asyncio.get_running_loop().run_in_executor(None, release.wait, TIMEOUT)
            return await core.infer(request, trace)

    with serving(lambda: HeldCore(), max_concurrent_rpcs=2) as running, grpc.insecure_channel(running.url) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        held = [stub.ModelInfer.future(raw_request(digits_rows(1)), timeout=TIMEOUT) for _ in range(2)]
        time.sleep(0.5)  # both are in flight
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(raw_request(digits_rows(1)), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert all(call.result().model_name == "digits" for call in held)


def test_other_rpcs_are_unimplemented(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("digits")
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_health_says_serving(served):
    for service in ("", "inference.GRPCInferenceService"):
        assert health_status(served.url, service) == health_pb2.HealthCheckResponse.SERVING


def test_loading_is_unavailable_until_the_core_is_ready(core):
    holder: dict[str, Any] = {"core": None}
    with serving(lambda: holder["core"]) as running:
        client = triton.InferenceServerClient(running.url)
        assert not client.is_server_ready()
        assert health_status(running.url, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (
            lambda: client.infer("digits", [tin(digits_rows(1))]),
            lambda: client.get_model_metadata("digits"),
        ):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.UNAVAILABLE"
        holder["core"] = core
        running.run(running.endpoint.set_serving(True))
        assert client.is_server_ready()
        assert health_status(running.url, "inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
        assert_answers(client, core)
        client.close()


def test_health_follows_the_whole_slot(tmp_path):
    """A worker whose sibling is gone (peers not ready) answers NOT_SERVING to health checks
    and not ready to ServerReady, though its own table says SERVING; back to SERVING after."""
    slot = {"siblings": False}
    worker = tiny_core(tmp_path, max_rows=MAX_ROWS)
    worker.peers_ready = lambda: slot["siblings"]
    with serving(lambda: worker) as running:
        running.run(running.endpoint.set_serving(True))
        client = triton.InferenceServerClient(running.url)
        for service in ("", "inference.GRPCInferenceService"):
            assert health_status(running.url, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not client.is_server_ready()
        assert_answers(client, worker)  # this worker itself still takes requests
        slot["siblings"] = True
        for service in ("", "inference.GRPCInferenceService"):
            assert health_status(running.url, service) == health_pb2.HealthCheckResponse.SERVING
        assert client.is_server_ready()
        with pytest.raises(grpc.RpcError) as info:  # an unknown service stays NOT_FOUND
            health_status(running.url, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        client.close()


@pytest.mark.parametrize("holder", ["grpc-server", "plain-socket"])
def test_taken_port_is_a_clear_error(served, holder):
    with contextlib.ExitStack() as stack:
        port = served.endpoint.port
        if holder == "plain-socket":
            listener = stack.enter_context(socket.socket())
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind the gRPC server to 127.0.0.1:{port}"):
            stack.enter_context(serving(lambda: None, port=port))


@pytest.mark.parametrize("datatype", ["BOOL", "INT8", "INT32", "INT64", "UINT8", "UINT64", "FP32", "FP64"])
def test_codec_reads_typed_and_raw_contents_alike(datatype):
    values = (np.arange(6) % (2 if datatype == "BOOL" else 100)).astype(V2_TO_NUMPY[datatype])
    raw, typed = pb2.ModelInferRequest(model_name="m"), pb2.ModelInferRequest(model_name="m")
    raw.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    raw.raw_input_contents.append(values.tobytes())
    field = {"BOOL": "bool", "INT64": "int64", "UINT64": "uint64", "FP32": "fp32", "FP64": "fp64"}.get(datatype)
    field = field or ("uint" if datatype.startswith("U") else "int")
    getattr(typed.inputs.add(name="x", datatype=datatype, shape=[2, 3]).contents, f"{field}_contents").extend(
        values.tolist()
    )
    for request in (raw, typed):
        tensor = from_model_infer_request(request).inputs[0]
        assert (tensor.data.dtype, tensor.shape, tensor.data.tolist()) == (values.dtype, (2, 3), values.tolist())


def test_codec_refuses_typed_values_out_of_range():
    request = pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(InvalidInput, match="out of range"):
        from_model_infer_request(request)
