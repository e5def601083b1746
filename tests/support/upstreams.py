"""A fake model-server slot for nginx tests: a real process with a REST and a gRPC port.

`FakeSlot("green", "v2")` starts `python upstreams.py` on free ports (bound to port 0 by
the child, which reports them). REST answers any GET/POST with JSON naming the slot and an
`X-Model-Version` header; gRPC serves the V2 `GRPCInferenceService` (ModelInfer,
ServerLive) answering `model_version`. Both record what they received. The parent steers
it through `/_fake/*` on the REST port (answer 503, sleep) and can SIGKILL it by pid.

`FakeSlot("green", "3", v2=True, slot_header="green")` answers V2 inference (REST
`POST .../infer` and gRPC ModelInfer) with a well-formed classification (the same digit
for every input) and, like the router in front of a slot, tags every answer with
`X-Canary-Slot` (gRPC: `x-canary-slot` initial metadata). `freeze()` SIGSTOPs it: it keeps
accepting connections and never answers.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import httpx


class FakeSlot:
    """Parent-side handle on one fake slot process; stop() or kill() only this child."""

    def __init__(self, name: str, version: str, *, v2: bool = False, slot_header: str | None = None) -> None:
        self.name, self.version = name, version
        self.v2, self.slot_header = v2, slot_header
        self.log = Path(tempfile.mkstemp(prefix=f"fake-slot-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self.rest_port = self.grpc_port = 0

    def start(self, timeout_s: float = 30.0) -> Self:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, "--name", self.name, "--version", self.version, *self._v2_args()],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:  # wait for the ports line, noticing a death
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s) or not (line := self.proc.stdout.readline()):
                tail = self.log.read_text()[-2000:]
                self.kill()
                raise RuntimeError(f"fake slot {self.name} did not start: {tail}")
        ports = json.loads(line)
        self.rest_port, self.grpc_port = ports["rest_port"], ports["grpc_port"]
        return self

    def _v2_args(self) -> list[str]:
        return (["--v2"] if self.v2 else []) + (["--slot-header", self.slot_header] if self.slot_header else [])

    def freeze(self) -> None:
        """Hang it: SIGSTOP. The kernel still accepts connections; nothing is answered.
        kill() and stop() work on a frozen slot."""
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def _control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            answer = client.post(self.url + path, json=body or {})
        answer.raise_for_status()
        return answer.json()

    def behave(self, status: int = 200, sleep_s: float = 0.0) -> None:
        """Answer every REST request with `status` after `sleep_s` seconds."""
        self._control("/_fake/mode", {"status": status, "sleep_s": sleep_s})

    def requests(self) -> list[dict[str, Any]]:
        """What it received: `protocol`, `method`, `path`, lower-cased `headers`."""
        return self._control("/_fake/requests")

    def reset(self) -> None:
        """Forget the recorded requests and answer 200 at once again."""
        self._control("/_fake/reset")

    def kill(self) -> None:
        """Crash it: SIGKILL, no shutdown; its log goes too (nothing reads a dead slot's)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(5)
            if self.proc.stdout:
                self.proc.stdout.close()
        self.log.unlink(missing_ok=True)

    def stop(self) -> None:
        """Terminate it (SIGKILL if it lingers) and remove its log (`kill`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- the child process ----


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []
        self.status, self.sleep_s = 200, 0.0

    def add(self, **entry: Any) -> None:
        with self.lock:
            self.seen.append(entry)


# The V2 answer of a `v2` fake: always digit 0, confidently (10 finite logits for one row).
V2_LOGITS = [4.0] + [0.0] * 9


def _v2_answer(path: str, version: str) -> dict[str, Any]:
    model = path.split("/")[3] if path.count("/") >= 4 else "digits"
    logits = {"name": "logits", "datatype": "FP32", "shape": [1, len(V2_LOGITS)], "data": V2_LOGITS}
    return {"model_name": model, "model_version": version, "outputs": [logits]}


def _rest_handler(
    name: str, version: str, rec: _Recorder, v2: bool = False, slot_header: str | None = None
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real model server behind nginx
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms ACK stall

        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Model-Version", version)
            if slot_header:
                self.send_header("X-Canary-Slot", slot_header)
            if status == 503:  # the real service's overload answer: "retry, possibly elsewhere"
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(data)

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path.startswith("/_fake/"):
                return self._control(body)
            headers = {k.lower(): v for k, v in self.headers.items()}
            rec.add(protocol="rest", method=self.command, path=self.path, headers=headers, body_bytes=len(body))
            if rec.sleep_s:
                time.sleep(rec.sleep_s)  # a slow model
            if rec.status != 200:
                return self._send(rec.status, {"error": "unavailable", "slot": name})
            if v2 and self.command == "POST" and self.path.endswith("/infer"):
                return self._send(200, _v2_answer(self.path, version))
            self._send(200, {"slot": name, "model_version": version, "method": self.command, "path": self.path})

        def _control(self, body: bytes) -> None:
            if self.path == "/_fake/mode":
                mode = json.loads(body or b"{}")
                rec.status, rec.sleep_s = mode.get("status", 200), mode.get("sleep_s", 0.0)
            elif self.path == "/_fake/reset":
                with rec.lock:
                    rec.seen.clear()
                rec.status, rec.sleep_s = 200, 0.0
            with rec.lock:
                self._send(200, list(rec.seen) if self.path == "/_fake/requests" else {"ok": True})

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # nginx gave up on a slow answer: fine

        do_GET = do_POST = do_PUT = _serve

    return Handler


def _grpc_server(
    name: str, version: str, rec: _Recorder, v2: bool = False, slot_header: str | None = None
) -> tuple[Any, int]:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
        def _record(self, method: str, context: Any) -> None:
            rec.add(protocol="grpc", method=method, path=method, headers=dict(context.invocation_metadata()))

        def ServerLive(self, request: Any, context: Any) -> Any:
            self._record("ServerLive", context)
            context.set_trailing_metadata((("x-slot", name),))
            return service_pb2.ServerLiveResponse(live=True)

        def ModelInfer(self, request: Any, context: Any) -> Any:
            self._record("ModelInfer", context)
            if slot_header:
                context.send_initial_metadata((("x-canary-slot", slot_header),))
            answer = service_pb2.ModelInferResponse(model_name=request.model_name, model_version=version, id=name)
            if v2:
                answer.outputs.add(name="logits", datatype="FP32", shape=[1, len(V2_LOGITS)])
                answer.raw_output_contents.append(struct.pack(f"<{len(V2_LOGITS)}f", *V2_LOGITS))
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--v2", action="store_true", help="answer V2 inference with a valid classification")
    parser.add_argument("--slot-header", default=None, help="X-Canary-Slot value on every answer")
    args = parser.parse_args()
    rec = _Recorder()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(args.name, args.version, rec, args.v2, args.slot_header))
    http.daemon_threads = True
    grpc_server, grpc_port = _grpc_server(args.name, args.version, rec, args.v2, args.slot_header)
    print(json.dumps({"rest_port": http.server_address[1], "grpc_port": grpc_port}), flush=True)
    try:
        http.serve_forever()
    finally:
        grpc_server.stop(0)


if __name__ == "__main__":
    main()
