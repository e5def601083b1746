"""The nginx traffic layer against a real nginx (Lua balancer) and real fake-slot processes.

One nginx and two fake slots (blue = v1 stable, green = v2 candidate) serve the module;
each test starts from weight 0, shadow off, healthy slots and empty request logs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from deploy.nginx import (
    MODULES_DIR,
    NginxConfigError,
    NginxController,
    NginxError,
    NginxPorts,
    Routing,
    SlotAddress,
    ensure_token,
    render_config,
    write_routing_file,
)
from deploy.process import free_port
from tests.support.listeners import listen_addresses
from tests.support.upstreams import FakeSlot
from tests.support.waiting import wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NEEDED = [Path(NGINX), MODULES_DIR / "ngx_http_lua_module.so", MODULES_DIR / "ndk_http_module.so",
          Path("/usr/share/lua/5.1/resty/core.lua")]  # fmt: skip
SHADOW_TIMEOUT_S = 1.0
FAIL_TIMEOUT_S = 2  # short, so a slot marked down by one test is healthy again for the next
UPSTREAM_TIMEOUT_S = 1.5  # a slot silent this long has failed (hung-slot tests)
MAX_FAILS = 3
VERSIONS = {"blue": "v1", "green": "v2"}


@dataclass
class Stack:
    prefix: Path
    ports: NginxPorts
    controller: NginxController
    token: str
    force_token: str
    slots: dict[str, FakeSlot] = field(default_factory=dict)

    def force(self, mode: str) -> dict[str, str]:
        """Headers of a privileged client forcing a slot (`always` = candidate, `never` = stable)."""
        return {"X-Canary": mode, "X-Canary-Force-Token": self.force_token}

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.rest}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def addresses(self) -> list[SlotAddress]:
        return [SlotAddress(n, "127.0.0.1", s.rest_port, s.grpc_port) for n, s in sorted(self.slots.items())]

    def render(self, generation: int, **overrides: Any) -> str:
        args: dict[str, Any] = {
            "prefix": self.prefix, "ports": self.ports, "slots": self.addresses(), "config_generation": generation,
            "routing_file": self.prefix / "routing.json", "token_file": self.prefix / "admin.token",
            "shadow_timeout_s": SHADOW_TIMEOUT_S, "fail_timeout_s": FAIL_TIMEOUT_S, "max_fails": MAX_FAILS,
            "force_token_file": self.prefix / "force.token", "upstream_timeout_s": UPSTREAM_TIMEOUT_S,
        }  # fmt: skip
        return render_config(**{**args, **overrides})

    def route(self, slots: list[SlotAddress] | None = None, **routing: Any) -> dict[str, Any]:
        """What the release code does: write the routing file, then tell nginx."""
        new = Routing(**{"stable": "blue", "candidate": "green", **routing})
        slots = slots or self.addresses()
        write_routing_file(self.prefix / "routing.json", new, slots)
        return self.controller.set_routing(new, self.token, slots)

    def status(self) -> dict[str, Any]:
        return self.controller.status(self.token)

    def master_pid(self) -> int:
        return int((self.prefix / "nginx.pid").read_text())


@pytest.fixture(scope="module")
def running_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        pytest.fail(f"needs nginx with Debian's lua module: run `make setup`; missing {', '.join(missing)}",
                    pytrace=False)  # fmt: skip
    prefix = tmp_path_factory.mktemp("nginx")
    stack = Stack(prefix, NginxPorts(free_port(), free_port(), free_port()),  # public host: the default
                  NginxController(prefix, NGINX, timeout_s=10.0), ensure_token(prefix / "admin.token"),
                  ensure_token(prefix / "force.token"))  # fmt: skip
    try:
        for name, version in VERSIONS.items():
            stack.slots[name] = FakeSlot(name, version).start()
        stack.controller.apply(stack.render(1), 1)
        yield stack
    finally:
        stack.controller.stop()
        for slot in stack.slots.values():
            slot.stop()


@pytest.fixture
def stack(running_stack: Stack) -> Stack:
    """The module's stack, back to: blue stable, green candidate at 0 %, no shadow, healthy."""
    for name, slot in running_stack.slots.items():
        if slot.proc is None or slot.proc.poll() is not None:
            running_stack.slots[name] = FakeSlot(name, VERSIONS[name]).start()  # a test killed it
        else:
            running_stack.slots[name].reset()
    if not running_stack.controller.running():
        running_stack.controller.start()
    running_stack.route(weight=0)
    wait_until(lambda: not any(s["down"] for s in running_stack.status()["slots"].values()),
               FAIL_TIMEOUT_S + 2, "slots marked down by an earlier test to recover")  # fmt: skip
    return running_stack


def slot_of(answer: httpx.Response) -> str:
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-canary-slot"] == answer.json()["slot"]
    assert answer.headers["x-model-version"] == VERSIONS[answer.json()["slot"]]
    return answer.json()["slot"]


def infer(client: httpx.Client, **headers: str) -> str:
    return slot_of(client.post("/v2/models/digits/infer", json={"inputs": [1, 2, 3]}, headers=headers))


def grpc_version(client: grpcclient.InferenceServerClient, headers: dict[str, str] | None = None) -> str:
    data = grpcclient.InferInput("x", [1], "FP32")
    data.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    return client.infer("digits", [data], headers=headers).get_response().model_version


def alive(pid: int) -> bool:
    """Not gone and not a zombie (a daemonised master is reparented to an init that may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def worker_pids(master: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                pids.add(int(entry.name))
        except OSError:
            continue  # exited while we looked
    return pids


# ---- routing ----


@pytest.mark.parametrize("weight", [0, 100, 30])
def test_split_matches_weight(stack: Stack, weight: int) -> None:
    stack.route(weight=weight)
    before = stack.status()["slots"]
    with httpx.Client(base_url=stack.rest_url) as one, httpx.Client(base_url=stack.rest_url) as two:
        counts = Counter(infer(one if i % 2 else two) for i in range(1000))
    assert abs(counts["green"] / 10 - weight) <= 3, counts
    # nginx's own per-slot counters agree (they are bumped in the log phase, just after the answer)
    wait_until(lambda: all(stack.status()["slots"][n]["requests"] - before[n]["requests"] == counts[n]
                           for n in VERSIONS), 2, f"status request counters to reach {counts}")  # fmt: skip


def test_weight_changes_apply_within_a_second_without_reload(stack: Stack) -> None:
    master = stack.master_pid()
    workers = worker_pids(master)
    failures: list[str] = []
    sent = Counter[str]()
    done = threading.Event()

    def rest_load() -> None:
        with httpx.Client(base_url=stack.rest_url, timeout=10) as client:
            while not done.is_set():
                try:
                    infer(client)
                except (AssertionError, httpx.HTTPError) as exc:
                    failures.append(f"rest: {exc!r}")
                sent["rest"] += 1

    def grpc_load() -> None:
        with grpcclient.InferenceServerClient(stack.grpc_target) as client:
            while not done.is_set():
                try:
                    grpc_version(client)
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(f"grpc: {exc!r}")
                sent["grpc"] += 1

    loaders = [threading.Thread(target=rest_load), threading.Thread(target=grpc_load)]
    for thread in loaders:
        thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports.rest, timeout=10)
    try:
        conn.request("GET", "/ping")
        conn.getresponse().read()
        sock = conn.sock  # http.client opens a new socket if nginx ever closes this one
        for change in range(20):
            weight = 100 if change % 2 == 0 else 0
            stack.route(weight=weight)
            expected, deadline = ("green" if weight else "blue"), time.monotonic() + 1.0
            while True:
                conn.request("POST", "/v2/models/digits/infer", b"{}", {"Content-Type": "application/json"})
                if json.loads(conn.getresponse().read())["slot"] == expected:
                    break
                assert time.monotonic() < deadline, f"weight {weight} not in effect after 1 s"
            assert conn.sock is sock, f"keep-alive connection closed at weight change {change}"
    finally:
        done.set()
        for thread in loaders:
            thread.join(15)
        conn.close()
    assert failures == [], failures[:5]
    assert sent["rest"] > 20 and sent["grpc"] > 20, sent
    assert stack.master_pid() == master and worker_pids(master) == workers, "nginx reloaded or restarted"
    assert stack.status()["config_generation"] == 1


def test_header_forces_slot_only_with_the_force_token(stack: Stack) -> None:
    with httpx.Client(base_url=stack.rest_url) as client:
        assert {infer(client, **stack.force("always")) for _ in range(20)} == {"green"}
        # an anonymous client, or one with a wrong token, is routed as if it sent nothing
        assert {infer(client, **{"X-Canary": "always"}) for _ in range(20)} == {"blue"}
        wrong = {"X-Canary": "always", "X-Canary-Force-Token": stack.force_token[:-1] + "x"}
        assert {infer(client, **wrong) for _ in range(20)} == {"blue"}
        assert {infer(client) for _ in range(20)} == {"blue"}
        stack.route(weight=100)
        assert {infer(client, **stack.force("never")) for _ in range(20)} == {"blue"}
        assert {infer(client, **{"X-Canary": "never"}) for _ in range(20)} == {"green"}
        stack.route(candidate=None)
        nothing = client.post("/v2/models/digits/infer", json={}, headers=stack.force("always"))
    assert nothing.status_code == 503 and "no candidate" in nothing.json()["error"]


def test_an_allow_listed_network_forces_without_the_token(stack: Stack) -> None:
    """Also: once `apply` returns, every new connection gets the new config. Right after a
    reload the old workers may still accept for a moment; apply waits until they stopped."""

    def forced_on_new_connections() -> set[str]:
        answered = set()
        for _ in range(10):
            with httpx.Client(base_url=stack.rest_url) as client:
                answered.add(infer(client, **{"X-Canary": "always"}))
        return answered

    try:
        for _ in range(4):
            stack.controller.apply(stack.render(2, force_allow=("127.0.0.0/8",)), 2)
            assert stack.status()["serving_generations"] == [2]
            assert forced_on_new_connections() == {"green"}
            stack.controller.apply(stack.render(1), 1)
            assert forced_on_new_connections() == {"blue"}
    finally:
        stack.controller.apply(stack.render(1), 1)  # the other tests expect generation 1


def test_user_sticks_to_one_slot(stack: Stack) -> None:
    stack.route(weight=50)
    with httpx.Client(base_url=stack.rest_url) as client:
        for user in ("alice", "bob", "carol"):
            seen = {infer(client, **{"X-User-Id": user}) for _ in range(50)}
            assert len(seen) == 1, f"{user} moved between slots: {seen}"
            client.cookies.set("canary-user", user)
            assert infer(client) == seen.pop(), "cookie canary-user and X-User-Id disagree"
            client.cookies.clear()
        users = Counter(infer(client, **{"X-User-Id": f"user-{i}"}) for i in range(400))
    assert 35 <= users["green"] / 4 <= 65, users


def test_grpc_reaches_chosen_slot_and_obeys_metadata(stack: Stack) -> None:
    with grpcclient.InferenceServerClient(stack.grpc_target) as client:
        assert client.is_server_live()
        assert {grpc_version(client) for _ in range(10)} == {"v1"}
        assert grpc_version(client, {"x-canary": "always"}) == "v1"  # no token: not forced
        token = {"x-canary-force-token": stack.force_token}
        assert grpc_version(client, {"x-canary": "always", **token}) == "v2"
        stack.route(weight=100)
        assert {grpc_version(client) for _ in range(10)} == {"v2"}
        assert grpc_version(client, {"x-canary": "never", **token}) == "v1"
        stack.route(weight=50)
        assert len({grpc_version(client, {"x-user-id": "alice"}) for _ in range(20)}) == 1
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        forced = (("x-canary", "never"), ("x-canary-force-token", stack.force_token))
        _, call = stub.ServerLive.with_call(service_pb2.ServerLiveRequest(), metadata=forced)
        assert ("x-canary-slot", "blue") in call.initial_metadata()


# ---- passive health ----


def test_v2_paths_go_to_the_slot_v2_listener_and_the_rest_to_bentoml(stack: Stack) -> None:
    """/v2/ goes to a slot's own V2 listener (v2_port), the native API to BentoML (rest_port)."""
    listener = FakeSlot("blue", "v2-listener").start()
    try:
        blue, green = stack.slots["blue"], stack.slots["green"]
        slots = [
            SlotAddress("blue", "127.0.0.1", blue.rest_port, blue.grpc_port, listener.rest_port),
            SlotAddress("green", "127.0.0.1", green.rest_port, green.grpc_port),
        ]
        stack.route(slots=slots, weight=0)
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            v2 = client.post(stack.rest_url + "/v2/models/digits/infer", json={})
            native = client.post(stack.rest_url + "/classify", json={})
        assert v2.headers["x-model-version"] == "v2-listener" and v2.headers["x-canary-slot"] == "blue"
        assert native.headers["x-model-version"] == VERSIONS["blue"]
        assert stack.status()["slots"]["blue"]["v2_port"] == listener.rest_port
        assert stack.status()["slots"]["green"]["v2_port"] == green.rest_port  # none given: BentoML's
    finally:
        stack.route(weight=0)
        listener.stop()


def test_killed_candidate_costs_no_request(stack: Stack) -> None:
    stack.route(weight=50)
    answers = []
    with httpx.Client(base_url=stack.rest_url) as client:
        for i in range(200):
            if i == 50:
                stack.slots["green"].kill()
            answers.append(infer(client))  # asserts 200 from a live slot
    assert "green" in answers[:50] and set(answers[50:]) == {"blue"}
    green = stack.status()["slots"]["green"]  # both keys expire FAIL_TIMEOUT_S after they were set
    assert green["recent_failures"] >= 1 or green["down"], green
    with grpcclient.InferenceServerClient(stack.grpc_target) as client:
        assert {grpc_version(client) for _ in range(20)} == {"v1"}


def test_unreachable_slot_is_retried_on_the_other_and_marked_down_after_max_fails(stack: Stack) -> None:
    blue = stack.addresses()[0]
    dead = SlotAddress("green", "127.0.0.1", free_port(), free_port())  # nothing listens there
    stack.route(weight=100, slots=[blue, dead])
    with grpcclient.InferenceServerClient(stack.grpc_target) as client:
        assert grpc_version(client) == "v1"  # gRPC first: green is not yet marked down
    assert not stack.status()["slots"]["green"]["down"], "one stray failure must not take a slot out"
    with httpx.Client(base_url=stack.rest_url) as client:
        assert {infer(client) for _ in range(10)} == {"blue"}
    assert stack.status()["slots"]["green"]["down"]


def test_a_slots_own_503_reaches_the_client_and_never_marks_it_down(stack: Stack) -> None:
    """Overload is not failure: a 503 with Retry-After is passed on, not retried elsewhere."""
    stack.slots["green"].behave(status=503)
    stack.route(weight=100)
    with httpx.Client(base_url=stack.rest_url) as client:
        answers = [client.post("/v2/models/digits/infer", json={}) for _ in range(20)]
    assert {(a.status_code, a.headers["x-canary-slot"], a.headers.get("retry-after")) for a in answers} == {
        (503, "green", "1")
    }
    assert stack.slots["blue"].requests() == [], "an overloaded candidate's requests moved to stable"
    assert not stack.status()["slots"]["green"]["down"]


def test_overloaded_stable_at_weight_0_never_spills_onto_the_candidate(stack: Stack) -> None:
    stack.slots["blue"].behave(status=503)
    with httpx.Client(base_url=stack.rest_url) as client:
        answers = [client.post("/v2/models/digits/infer", json={}) for _ in range(30)]
    assert {a.status_code for a in answers} == {503}
    assert stack.slots["green"].requests() == []
    assert not stack.status()["slots"]["blue"]["down"]


def test_dead_stable_at_weight_0_is_not_replaced_by_the_untested_candidate(stack: Stack) -> None:
    stack.slots["blue"].kill()
    with httpx.Client(base_url=stack.rest_url) as client:
        answers = [client.post("/v2/models/digits/infer", json={}) for _ in range(10)]
    assert {a.status_code for a in answers} == {503}
    assert {a.headers["x-canary-slot"] for a in answers} == {"blue"}
    assert all("slot blue did not answer" in a.json()["error"] for a in answers)
    assert stack.slots["green"].requests() == []


def test_a_request_routed_before_a_promote_reaches_the_new_stable(stack: Stack) -> None:
    """`promote` moves the roles, then stops the old stable. A request nginx routed before the
    change (its slot is chosen on the headers; here the body is still uploading) connects
    after it: the new stable answers it, not the stopped slot's 503."""
    body = json.dumps({"inputs": [1, 2, 3]}).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: canary\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection(("127.0.0.1", stack.ports.rest), timeout=10) as sock:
        sock.sendall(head + body[:4])
        time.sleep(0.5)  # nginx routes on the headers: to blue, stable at weight 0
        stack.route(stable="green", candidate=None, weight=0)  # what promote does, then:
        stack.slots["blue"].stop()
        sock.sendall(body[4:])
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        text = answer.read()
    assert answer.status == 200, text
    assert answer.getheader("x-canary-slot") == json.loads(text)["slot"] == "green"
    assert stack.status()["slots"]["blue"]["recent_failures"] == 0  # no connect to the stopped slot


@pytest.mark.parametrize("mode", ["always", "never"])
def test_a_forced_request_never_fails_over(stack: Stack, mode: str) -> None:
    """The gate forces each slot; an answer from the other slot would be measured as this one's."""
    forced, other = ("green", "blue") if mode == "always" else ("blue", "green")
    stack.route(weight=50)
    stack.slots[forced].kill()
    with httpx.Client(base_url=stack.rest_url) as client:
        for path in ("/v2/models/digits/infer", "/classify"):
            answers = [client.post(path, json={}, headers=stack.force(mode)) for _ in range(5)]
            assert {a.status_code for a in answers} == {503}, path
            assert {a.headers["x-canary-slot"] for a in answers} == {forced}
            assert "forced" in answers[0].json()["error"]
    assert stack.slots[other].requests() == []
    with grpcclient.InferenceServerClient(stack.grpc_target) as client:
        metadata = {"x-canary": mode, "x-canary-force-token": stack.force_token}
        with pytest.raises(grpcclient.InferenceServerException, match="StatusCode.UNAVAILABLE"):
            grpc_version(client, metadata)
    assert stack.slots[other].requests() == []


def test_a_hung_candidate_times_out_forced_and_costs_unforced_clients_nothing(stack: Stack) -> None:
    stack.slots["green"].behave(sleep_s=UPSTREAM_TIMEOUT_S + 3)
    stack.route(weight=100)
    with httpx.Client(base_url=stack.rest_url, timeout=UPSTREAM_TIMEOUT_S + 10) as client:
        forced = client.post("/v2/models/digits/infer", json={}, headers=stack.force("always"))
        assert forced.status_code == 503 and forced.headers["x-canary-slot"] == "green"
    # unforced, several clients at once (as in production): each request green holds past the
    # timeout moves to blue, and MAX_FAILS timeouts within the window take green out
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> str:
        with httpx.Client(base_url=stack.rest_url, timeout=UPSTREAM_TIMEOUT_S + 10) as client:
            return infer(client)

    with ThreadPoolExecutor(MAX_FAILS + 3) as pool:
        assert set(pool.map(one, range(MAX_FAILS + 3))) == {"blue"}
    assert stack.status()["slots"]["green"]["down"]


# ---- shadow ----


def test_shadow_copies_reach_candidate_only_when_on(stack: Stack) -> None:
    stack.route(weight=0, shadow=True)
    green = stack.slots["green"]
    with httpx.Client(base_url=stack.rest_url) as client:
        assert {infer(client, **{"X-Canary-Shadow": "1"}) for _ in range(20)} == {"blue"}
        client.get("/v2/health/ready")  # GETs are not mirrored
        copies = wait_until(lambda: len(got := green.requests()) >= 20 and got, 5, "20 shadow copies")
        assert len(copies) == 20 and all(c["method"] == "POST" and c["body_bytes"] > 0 for c in copies)
        assert {c["headers"].get("x-canary-shadow") for c in copies} == {"1"}
        # a client cannot make stable traffic look like shadow traffic
        assert all("x-canary-shadow" not in r["headers"] for r in stack.slots["blue"].requests())
        assert stack.status()["slots"]["green"]["shadow_requests"] >= 20

        stack.route(weight=0, shadow=False)
        green.reset()
        for _ in range(20):
            infer(client)
        # nginx reads the next request on a keep-alive connection only after the previous
        # request's mirror finished, so once this answer is back no copy is still on its way
        client.get("/v2/health/ready")
    assert green.requests() == []


# ---- request ids and feedback ----

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_every_request_gets_a_sane_request_id_that_the_slot_sees_and_the_client_gets_back(stack: Stack) -> None:
    hostile = ["has space", "x" * 129, "a,b", "<script>"]
    with httpx.Client(base_url=stack.rest_url) as client:
        made = client.post("/v2/models/digits/infer", json={})
        kept = client.post("/v2/models/digits/infer", json={}, headers={"X-Request-Id": "order-17.a:b_c"})
        replaced = [client.post("/v2/models/digits/infer", json={}, headers={"X-Request-Id": bad}) for bad in hostile]
        native = client.post("/classify", json={})  # BentoML's port gets one too
    rest_seen = [r["headers"].get("x-request-id") for r in stack.slots["blue"].requests()]
    answers = [made, kept, *replaced, native]
    assert rest_seen == [a.headers["x-request-id"] for a in answers]  # what the slot saw, the client got
    assert rest_seen[1] == "order-17.a:b_c"
    assert all(HEX32.fullmatch(rid) for rid in rest_seen[:1] + rest_seen[2:]), rest_seen
    assert len(set(rest_seen)) == len(rest_seen)
    request = service_pb2.ModelInferRequest(model_name="digits")
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for metadata in ((("x-request-id", "grpc-order-1"),), (("x-request-id", "bad id"),), ()):
            stub.ModelInfer(request, metadata=metadata, timeout=10)
    grpc_seen = [r["headers"].get("x-request-id") for r in stack.slots["blue"].requests() if r["protocol"] == "grpc"]
    assert grpc_seen[0] == "grpc-order-1" and all(HEX32.fullmatch(rid or "") for rid in grpc_seen[1:]), grpc_seen
    # nginx's own answer (a forced request whose slot is dead) carries the id too
    stack.slots["green"].kill()
    failed = httpx.post(stack.rest_url + "/v2/models/digits/infer", json={},
                        headers={**stack.force("always"), "X-Request-Id": "forced-1"}, timeout=10)  # fmt: skip
    assert failed.status_code == 503 and failed.headers["x-request-id"] == "forced-1"


def test_feedback_is_public_capped_at_1_mib_and_never_mirrored(stack: Stack) -> None:
    stack.route(weight=0, shadow=True)
    blue, green = stack.slots["blue"], stack.slots["green"]
    label = {"id": "some-request", "label": 3}
    with httpx.Client(base_url=stack.rest_url, timeout=10) as client:
        posted = client.post("/v2/models/digits/feedback", json=label, headers={"X-Request-Id": "fb-1"})
        assert posted.status_code == 200 and posted.headers["x-canary-slot"] == "blue"
        assert posted.headers["x-request-id"] == "fb-1"
        too_big = client.post("/v2/models/digits/feedback", content=b"[" + b" " * (1 << 20) + b"]")
        assert too_big.status_code == 413
        client.post("/v2/models/digits/infer", json={}, headers={"X-Request-Id": "shadowed-1"})  # mirrored
        client.get("/v2/health/ready")  # the mirror of the previous request has finished
    assert [r["path"] for r in blue.requests()] == [
        "/v2/models/digits/feedback", "/v2/models/digits/infer", "/v2/health/ready"]  # fmt: skip
    copies = green.requests()
    assert [(c["path"], c["headers"].get("x-request-id")) for c in copies] == [
        ("/v2/models/digits/infer", "shadowed-1")
    ]


def test_slow_shadow_candidate_does_not_slow_clients(stack: Stack) -> None:
    sleep_s = 4.0  # well past the bound below: a client that waited for the candidate fails it
    stack.slots["green"].behave(sleep_s=sleep_s)
    stack.route(weight=0, shadow=True)
    latencies = []
    with httpx.Client(base_url=stack.rest_url) as keep_alive:
        for i in range(6):
            started = time.monotonic()
            if i % 2:
                assert infer(keep_alive) == "blue"  # waits for the previous mirror: <= shadow timeout
            else:
                with httpx.Client(base_url=stack.rest_url) as fresh:
                    assert infer(fresh) == "blue"
            latencies.append(time.monotonic() - started)
    assert max(latencies) < SHADOW_TIMEOUT_S + 1.5 < sleep_s, latencies  # slack for a stall on a busy CI
    wait_until(lambda: len(stack.slots["green"].requests()) >= 6, 5, "shadow copies at the slow candidate")


# ---- admin API ----


def test_admin_api_needs_token_and_loopback(stack: Stack) -> None:
    admin = f"http://127.0.0.1:{stack.ports.admin}"
    with httpx.Client(trust_env=False) as client:
        assert client.get(f"{admin}/canary/status").status_code == 401
        assert client.get(f"{admin}/canary/status", headers={"X-Canary-Token": "guess"}).status_code == 401
        put = client.put(f"{admin}/canary/routing", json={"stable": "blue", "candidate": "green", "weight": 100,
                                                          "shadow": False})  # fmt: skip
        assert put.status_code == 401
        assert stack.status()["weight"] == 0
        for url in (f"{stack.rest_url}/canary/status", f"{stack.rest_url}/canary/routing"):
            assert client.request("GET", url, headers={"X-Canary-Token": stack.token}).status_code == 404
    assert all("/canary/" not in r["path"] for s in stack.slots.values() for r in s.requests())
    assert listen_addresses(stack.ports.admin) == {"127.0.0.1"}


# ---- exposure ----


def test_public_listeners_bind_loopback_unless_told_otherwise(stack: Stack) -> None:
    """`ss -ltn`: nothing of this nginx listens on every interface; the fixture names no host."""
    for port in (stack.ports.rest, stack.ports.grpc, stack.ports.admin):
        assert listen_addresses(port) == {"127.0.0.1"}, port


HIDDEN = ["/metrics", "/metrics/", "/%6Detrics", "//metrics", "/docs", "/docs.json", "/", "/static_content/x.css",
          "/assets/x.js", "/canary/status", "/canary/routing"]  # fmt: skip


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_public_listener_hides_bentomls_metrics_and_docs_and_the_admin_api(stack: Stack, method: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports.rest, timeout=10)  # sends paths as written
    try:
        for path in HIDDEN:
            conn.request(method, path, headers={"X-Canary-Token": stack.token, **stack.force("always")})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 404, path
            assert answer.getheader("x-canary-slot") is None, path
    finally:
        conn.close()
    with httpx.Client(base_url=stack.rest_url, trust_env=False) as client:
        assert infer(client) == "blue"  # the API itself still passes, and so does BentoML's schema
        assert slot_of(client.post("/classify", json={})) == "blue"
        assert slot_of(client.get("/schema.json")) == "blue"
    seen = {r["path"] for s in stack.slots.values() for r in s.requests()}
    assert seen == {"/v2/models/digits/infer", "/classify", "/schema.json"}, seen
    # Prometheus still reads the router on the admin listener (and the slots on their own ports)
    assert httpx.get(f"http://127.0.0.1:{stack.ports.admin}/metrics", trust_env=False).status_code == 200


def test_admin_api_moves_a_slot_only_within_the_hosts_the_config_names(stack: Stack) -> None:
    """A leaked admin token must not send clients' requests to a server of its holder's choosing."""
    green = stack.slots["green"]
    for host in ("10.9.9.9", "localhost", "127.0.0.2"):
        body = {"stable": "blue", "candidate": "green", "weight": 100, "shadow": False,
                "slots": {"green": {"host": host, "rest_port": green.rest_port, "grpc_port": green.grpc_port}}}  # fmt: skip
        answer = httpx.put(f"http://127.0.0.1:{stack.ports.admin}/canary/routing", json=body,
                           headers={"X-Canary-Token": stack.token}, trust_env=False)  # fmt: skip
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == f"slot green: host {host} is not a slot host of this config (127.0.0.1)"
    status = stack.status()
    assert (status["weight"], status["slots"]["green"]["host"]) == (0, "127.0.0.1")
    with pytest.raises(NginxError, match="not a slot host"):
        stack.route(slots=[stack.addresses()[0], SlotAddress("green", "10.9.9.9", 3000, 50051)])
    stack.route(weight=0)  # the routing file (written before the refused call) back to what runs


def test_a_routing_file_naming_another_host_is_refused_at_reload(stack: Stack) -> None:
    live, routing_file = (stack.prefix / "nginx.conf").read_text(), stack.prefix / "routing.json"
    good = routing_file.read_text()
    doc = json.loads(good)
    doc["slots"]["green"]["host"] = "10.9.9.9"
    routing_file.write_text(json.dumps(doc))
    try:
        with pytest.raises(NginxConfigError, match="init_by_lua error: .*host 10.9.9.9 is not a slot host"):
            NginxController(stack.prefix, NGINX, timeout_s=6.0).apply(stack.render(2), 2)
    finally:
        routing_file.write_text(good)
    assert (stack.prefix / "nginx.conf").read_text() == live
    assert stack.status()["config_generation"] == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"weight": 101}, "weight must be an integer 0-100"),
        ({"weight": "30"}, "weight must be an integer 0-100"),
        ({"weight": 30.5}, "weight must be an integer 0-100"),
        ({"stable": "purple"}, "stable must name a known slot"),
        ({"candidate": "blue"}, "candidate must differ"),
        ({"candidate": None, "weight": 10}, "needs a candidate"),
        ({"shadow": "yes"}, "shadow must be true or false"),
    ],
)
def test_admin_api_rejects_bad_routing(stack: Stack, body: dict[str, Any], reason: str) -> None:
    full = {"stable": "blue", "candidate": "green", "weight": 0, "shadow": False, **body}
    answer = httpx.put(f"http://127.0.0.1:{stack.ports.admin}/canary/routing", json=full,
                       headers={"X-Canary-Token": stack.token}, trust_env=False)  # fmt: skip
    assert answer.status_code == 400 and reason in answer.json()["error"], answer.text
    assert stack.status()["weight"] == 0


def test_admin_api_rejects_malformed_json(stack: Stack) -> None:
    answer = httpx.put(f"http://127.0.0.1:{stack.ports.admin}/canary/routing", content=b'{"weight": 5',
                       headers={"X-Canary-Token": stack.token}, trust_env=False)  # fmt: skip
    assert answer.status_code == 400 and "invalid JSON" in answer.json()["error"]
    with pytest.raises(NginxError, match="401"):
        stack.controller.set_routing(Routing("blue", "green", 10), "wrong-token")


# ---- applying configs ----


def test_broken_config_is_refused_and_old_one_keeps_serving(stack: Stack) -> None:
    live, master = (stack.prefix / "nginx.conf").read_text(), stack.master_pid()
    broken = stack.render(2).replace("events {", "no_such_directive on;\nevents {")
    with pytest.raises(NginxConfigError, match='unknown directive "no_such_directive"'):
        stack.controller.apply(broken, 2)
    with pytest.raises(NginxConfigError, match="token file .* unreadable"):  # refused by the Lua init
        stack.controller.apply(stack.render(2, token_file=stack.prefix / "missing.token"), 2)
    assert (stack.prefix / "nginx.conf").read_text() == live
    assert not list(stack.prefix.glob("nginx.conf.*.new"))
    assert stack.master_pid() == master and stack.status()["config_generation"] == 1
    with httpx.Client(base_url=stack.rest_url) as client:
        assert infer(client) == "blue"


def test_reload_that_nginx_cannot_apply_is_not_confirmed(stack: Stack) -> None:
    """`nginx -t` passes both configs and `nginx -s reload` would exit 0: only the config
    generation nginx reports shows that the reload did not happen."""
    live = (stack.prefix / "nginx.conf").read_text()
    impatient = NginxController(stack.prefix, NGINX, timeout_s=6.0)
    with socket.socket() as taken:  # a public port someone else holds: the reload cannot bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = NginxPorts(taken.getsockname()[1], stack.ports.grpc, stack.ports.admin, public_host="127.0.0.1")
        with pytest.raises(NginxConfigError, match="did not confirm config generation 2.*Address already in use"):
            impatient.apply(stack.render(2, ports=ports), 2)
    routing_file = stack.prefix / "routing.json"
    good = routing_file.read_text()
    routing_file.write_text('{"stable": "blue", "weight": ')  # `nginx -t` never runs init_by_lua
    try:
        with pytest.raises(NginxConfigError, match="init_by_lua error: .*routing.json: invalid JSON"):
            impatient.apply(stack.render(2), 2)
    finally:
        routing_file.write_text(good)
    assert (stack.prefix / "nginx.conf").read_text() == live
    assert stack.status()["config_generation"] == 1
    with httpx.Client(base_url=stack.rest_url) as client:
        assert infer(client) == "blue"


def test_reload_is_confirmed_by_config_generation(stack: Stack) -> None:
    stack.route(weight=30)
    master, workers = stack.master_pid(), worker_pids(stack.master_pid())
    stack.controller.apply(stack.render(2), 2)
    try:
        status = stack.status()
        assert status["config_generation"] == 2 and status["weight"] == 30
        assert stack.master_pid() == master
        wait_until(lambda: worker_pids(master).isdisjoint(workers), 10, "old workers to finish")
        assert "# canary-config-generation: 1" in (stack.prefix / "nginx.conf.last-good").read_text()
    finally:
        stack.controller.apply(stack.render(1), 1)  # the other tests expect generation 1


def test_restart_restores_routing_from_file(stack: Stack) -> None:
    stack.route(weight=30, shadow=True)
    old_master = stack.master_pid()
    stack.controller.stop()
    assert not stack.controller.running() and not alive(old_master)
    stack.controller.start()
    status = stack.status()
    assert (status["stable"], status["candidate"], status["weight"], status["shadow"]) == ("blue", "green", 30, True)
    assert stack.master_pid() != old_master
    with httpx.Client(base_url=stack.rest_url) as client:
        assert infer(client, **stack.force("always")) == "green"


# ---- pure helpers ----


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stable": "blue", "candidate": "green", "weight": 101},
        {"stable": "blue", "candidate": "green", "weight": True},
        {"stable": "blue", "candidate": "blue"},
        {"stable": "blue", "weight": 5},
        {"stable": "Blue!"},
        {"stable": "blue", "candidate": "green", "shadow": "on"},
    ],
)
def test_routing_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as caught:
        Routing(**kwargs)
    assert "\n" not in str(caught.value)


def test_ensure_token_creates_a_private_file_once(tmp_path: Path) -> None:
    token = ensure_token(tmp_path / "state" / "admin.token")
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "admin.token").st_mode) == 0o600
    assert ensure_token(tmp_path / "state" / "admin.token") == token


def test_render_config_keeps_everything_in_the_prefix(tmp_path: Path) -> None:
    slots = [SlotAddress("blue", "127.0.0.1", 3001, 50051), SlotAddress("green", "127.0.0.1", 3002, 50052)]
    text = render_config(tmp_path, NginxPorts(8080, 8081, 8082), slots, tmp_path / "r.json", tmp_path / "t", 7)
    assert "/var/lib/nginx" not in text and "/etc/nginx" not in text
    assert "listen 127.0.0.1:8082;" in text and "# canary-config-generation: 7" in text
    # the public listeners bind loopback unless told otherwise
    assert "listen 127.0.0.1:8080;" in text and "listen 127.0.0.1:8081 http2;" in text
    with pytest.raises(ValueError, match="distinct"):
        render_config(tmp_path, NginxPorts(8080, 8081, 8082), slots * 2, tmp_path / "r.json", tmp_path / "t", 7)


@pytest.mark.parametrize(("host", "listen"), [("0.0.0.0", "0.0.0.0"), ("::", "[::]"), ("10.1.2.3", "10.1.2.3")])
def test_public_listeners_bind_the_host_they_are_given(tmp_path: Path, host: str, listen: str) -> None:
    slots = [SlotAddress("blue", "127.0.0.1", 3001, 50051)]
    ports = NginxPorts(8080, 8081, 8082, public_host=host)
    text = render_config(tmp_path, ports, slots, tmp_path / "r.json", tmp_path / "t", 7)
    assert f"listen {listen}:8080;" in text and f"listen {listen}:8081 http2;" in text
    assert "listen 127.0.0.1:8082;" in text  # the admin listener never moves with them


@pytest.mark.parametrize("host", ["example.com", "", "127.0.0.1; deny all"])
def test_the_public_host_must_be_an_ip_address(host: str) -> None:
    with pytest.raises(ValueError, match="nginx public host must be an IP address"):
        NginxPorts(8080, 8081, 8082, public_host=host)


def test_router_exports_weights_for_prometheus(stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stack.route(weight=30)
    with httpx.Client(base_url=stack.rest_url, trust_env=False) as client:
        for _ in range(10):
            infer(client)
        text = client.get(f"http://127.0.0.1:{stack.ports.admin}/metrics").text
    samples = {(s.name, s.labels.get("slot")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("canary_router_weight", "blue")] == 70 and samples[("canary_router_weight", "green")] == 30
    assert samples[("canary_router_requests_total", "blue")] + samples[("canary_router_requests_total", "green")] >= 10
    assert samples[("canary_router_slot_down", "green")] == 0
