"""The Open Inference Protocol (V2) peers: MLServer, KServe and LitServe, each in its own venv.

Their dependency pins clash with this project's (and with each other's), so each one runs
from `<bench home>/peers/<name>-<version>/`, a venv made with `python -m venv` and filled by
`pip install` of its pinned packages plus onnxruntime (our venv's version when pip can
resolve it next to the peer, else pip's choice) and numpy. `PeerEnv.ensure` is idempotent: a
stamp file in the venv records the pins it was made from and the versions pip installed; the
venv is only made again when the pin list changes. The servers are the scripts in
`bench/alternatives/` (`mlserver_runtime.py`, `kserve_app.py`, `litserve_app.py`); they run
in the peer's venv, so they import nothing from this project. Every peer serves the same
ONNX file with an ONNX Runtime `InferenceSession` (default session options).

`bench/contenders.py` `build_contenders` lists them after the other alternatives; their
names are in `config.CONTENDER_NAMES` (`--only mlserver kserve litserve` runs just them).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.alternatives import ONNX_PATH_ENV

if TYPE_CHECKING:  # bench.contenders imports this module from build_contenders
    from bench.contenders import ServeContext, Served
    from bench.prepare import PreparedModel

Say = Callable[[str], None]
PipRunner = Callable[[list[str], Path], "subprocess.CompletedProcess[str]"]

ALTERNATIVES_DIR = Path(__file__).resolve().parent / "alternatives"
STAMP = "bench-peer.json"
PIP_TIMEOUT_S = 1800.0
MODEL_NAME = "digits"
V2_INFER = f"/v2/models/{MODEL_NAME}/infer"
MAX_BATCH_SIZE = 64
MAX_BATCH_TIME_S = 0.002

MLSERVER_VERSION = "1.7.1"
KSERVE_VERSION = "0.21.0"
LITSERVE_VERSION = "0.2.19"


class PeerInstallError(RuntimeError):
    """A peer's venv could not be made or filled (the runner reports it as a failure)."""


def _stderr_say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _run_logged(argv: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    """Run one install step; its output is appended to `log` (and returned)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n[exit {done.returncode}]\n")
    return done


def our_onnxruntime() -> str | None:
    """The onnxruntime version of the running interpreter's environment (our venv), if any."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime")
    except PackageNotFoundError:
        return None


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class PeerEnv:
    """One peer's venv: `<root>/<name>-<version>/`, made and filled on first use."""

    name: str
    version: str
    packages: tuple[str, ...]  # the peer's pins, e.g. ("mlserver==1.7.1",)
    root: Path  # <bench home>/peers
    onnxruntime: str | None = None  # the version to try first (ours); None: pip's choice
    python: str = sys.executable  # the interpreter the venv is made from (the project's 3.11)
    run: PipRunner = _run_logged  # (argv, log) -> CompletedProcess; a fake one in the tests

    @property
    def path(self) -> Path:
        return self.root / f"{self.name}-{self.version}"

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def interpreter(self) -> Path:
        return self.bin / "python"

    @property
    def stamp(self) -> Path:
        return self.path / STAMP

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}-{self.version}.install.log"

    def pins(self) -> list[str]:
        """What the stamp records: the peer's pins, onnxruntime (ours, when known) and numpy."""
        ort = f"onnxruntime=={self.onnxruntime}" if self.onnxruntime else "onnxruntime"
        return [*self.packages, ort, "numpy"]

    def installed(self) -> dict[str, Any] | None:
        """The stamp of a venv made from the current pins, or None (missing, stale or broken)."""
        try:
            stamp = json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return None
        if stamp.get("pins") != self.pins() or not self.interpreter.exists():
            return None
        return stamp

    def ensure(self, say: Say = _stderr_say) -> dict[str, Any]:
        """Make the venv unless a stamp says it matches the pins; returns the stamp
        (`pins`, `versions`: {package: version} of what pip installed, `install_s`, ...)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():  # two bench runs never fill one venv at once
            stamp = self.installed()
            if stamp is not None:
                return stamp
            return self._install(say)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / f"{self.name}-{self.version}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _step(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return self.run(argv, self.log)
        except (OSError, subprocess.SubprocessError) as exc:
            raise PeerInstallError(f"{self.name} {self.version}: {what} failed: {exc}; log {self.log}") from exc

    def _install(self, say: Say) -> dict[str, Any]:
        started = time.monotonic()
        label = f"{self.name} {self.version}"
        if self.path.exists():
            say(f"{label}: pins changed or venv incomplete; making {self.path} again")
            shutil.rmtree(self.path)
        say(f"{label}: making a venv at {self.path} (once; later runs reuse it)")
        made = self._step([self.python, "-m", "venv", str(self.path)], "python -m venv")
        if made.returncode != 0:
            raise PeerInstallError(f"{label}: python -m venv failed:\n{_tail(made.stderr or made.stdout)}")
        pip = [str(self.interpreter), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        wanted = self.pins()
        say(f"{label}: pip install {' '.join(wanted)} (a few minutes the first time; log {self.log})")
        done = self._step([*pip, *wanted], "pip install")
        ort_fallback = False
        if done.returncode != 0 and self.onnxruntime:
            ort_fallback = True
            say(f"{label}: pip could not install onnxruntime=={self.onnxruntime} beside it; letting pip choose")
            done = self._step([*pip, *self.packages, "onnxruntime", "numpy"], "pip install")
        if done.returncode != 0:
            shutil.rmtree(self.path, ignore_errors=True)  # no half-filled venv is ever reused
            raise PeerInstallError(
                f"{label}: pip install {' '.join(wanted)} failed (exit {done.returncode}); "
                f"log {self.log}:\n{_tail(done.stderr or done.stdout)}"
            )
        listed = self._step([str(self.interpreter), "-m", "pip", "list", "--format=json"], "pip list")
        try:
            versions = {row["name"].lower(): row["version"] for row in json.loads(listed.stdout)}
        except (ValueError, KeyError, TypeError) as exc:
            raise PeerInstallError(f"{label}: could not read `pip list`: {exc}; log {self.log}") from exc
        stamp = {
            "pins": wanted,
            "onnxruntime_fallback": ort_fallback,
            "versions": versions,
            "install_s": round(time.monotonic() - started, 1),
            "python": self.python,
        }
        partial = self.stamp.with_suffix(".partial")
        partial.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        partial.replace(self.stamp)  # the stamp appears whole, last: it vouches for the venv
        say(f"{label}: installed in {stamp['install_s']:.0f}s: {describe_versions(stamp, self.packages)}")
        return stamp


def _dist(pin: str) -> str:
    """The distribution name of a pin ("kserve[storage]==0.21.0" -> "kserve")."""
    for mark in ("[", "=", "<", ">", "!", "~", " ", ";"):
        pin = pin.split(mark, 1)[0]
    return pin.strip().lower()


def describe_versions(stamp: dict[str, Any], packages: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """The versions a stamp recorded, as one line: "mlserver 1.7.1, onnxruntime 1.31.1, ..."."""
    versions = stamp.get("versions", {})
    names = [*(_dist(p) for p in packages), "onnxruntime", "numpy", *extra]
    text = ", ".join(f"{n} {versions.get(n, '?')}" for n in dict.fromkeys(names))
    if stamp.get("onnxruntime_fallback"):
        text += " (our onnxruntime version did not resolve beside it: pip chose)"
    return text


def peers_root(ctx: ServeContext) -> Path:
    """`<bench home>/peers`: `ctx.logs` is the bench home's `logs` folder (BenchHome.logs)."""
    return ctx.logs.parent / "peers"


# --- MLServer ---------------------------------------------------------------------------------


def mlserver_settings(http_port: int, grpc_port: int, metrics_port: int) -> dict[str, Any]:
    """MLServer's settings.json: inference in the main process, no per-request log, free ports."""
    return {
        "debug": False,  # MLServer's default (true) logs every request (REST and gRPC) and at DEBUG level
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,  # its Prometheus endpoint stays on (the default), on a free port
        "parallel_workers": 0,  # no inference pool: the model runs in the server's own process
        "load_models_at_startup": True,
    }


def mlserver_model_settings(onnx_path: Path) -> dict[str, Any]:
    """model-settings.json of the `digits` model: our ORT runtime with adaptive batching."""
    return {
        "name": MODEL_NAME,
        "implementation": "mlserver_runtime.OrtDigits",
        "max_batch_size": MAX_BATCH_SIZE,
        "max_batch_time": MAX_BATCH_TIME_S,
        "parameters": {"uri": str(onnx_path)},
    }


def write_mlserver_repo(folder: Path, onnx_path: Path, http_port: int, grpc_port: int, metrics_port: int) -> Path:
    """Write settings.json and `digits/model-settings.json` under `folder`; returns it."""
    model_dir = folder / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(
        json.dumps(mlserver_settings(http_port, grpc_port, metrics_port), indent=2) + "\n"
    )
    (model_dir / "model-settings.json").write_text(json.dumps(mlserver_model_settings(onnx_path), indent=2) + "\n")
    return folder


@contextmanager
def _peer_process(
    argv: list[str], ready_url: str, log: Path, env: dict[str, str], cwd: Path | None = None
) -> Iterator[int]:
    """Start a peer's server (our child, its own session) and wait until `ready_url` answers 200;
    stop its whole process tree after the block (bench.contenders._spawned)."""
    from bench.contenders import _spawned

    # the peer's interpreter gets none of our venv's paths (it has its own site-packages)
    env = {"PYTHONPATH": "", "VIRTUAL_ENV": "", "PYTHONUNBUFFERED": "1", **env}
    with _spawned(argv, ready_url, log, env, cwd=cwd) as pid:
        yield pid


def _v2_endpoints(base: str, grpc_port: int, ctx: ServeContext) -> tuple:
    """A peer's V2 REST JSON endpoint at `base` and its V2 gRPC endpoint on `grpc_port`."""
    from bench.contenders import Endpoint
    from bench.payloads import to_grpc, to_v2_json

    return (
        Endpoint("rest-json", base + V2_INFER, to_v2_json(ctx.rows)),
        Endpoint("grpc", f"127.0.0.1:{grpc_port}", to_grpc(ctx.rows, MODEL_NAME)),
    )


def _versions_note(peer: PeerEnv, stamp: dict[str, Any], extra: tuple[str, ...]) -> str:
    return f"own venv {peer.path}: {describe_versions(stamp, peer.packages, extra)}"


@dataclass(frozen=True)
class _VenvPeer:
    """What the three peers share: a venv of their own (`package==version` + onnxruntime),
    made once, and a log per model."""

    name: str = ""
    label: str = ""
    version: str = ""
    package: str = ""
    kind: str = "alternative"
    baseline: str | None = None
    say: Say = field(default=_stderr_say, compare=False)

    def env(self, root: Path) -> PeerEnv:
        return PeerEnv(self.name, self.version, (f"{self.package}=={self.version}",), root, our_onnxruntime())

    def _prepare(self, model: PreparedModel, ctx: ServeContext) -> tuple[PeerEnv, dict[str, Any], Path]:
        """The peer's venv (made on first use), its install stamp, and this model's log path."""
        peer = self.env(peers_root(ctx))
        return peer, peer.ensure(self.say), ctx.logs / f"bench-{self.name}-{model.architecture}.log"


@dataclass(frozen=True)
class MLServerPeer(_VenvPeer):
    """MLServer with a custom runtime (`mlserver_runtime.OrtDigits`: ORT on the decoded
    input), adaptive batching (max_batch_size 64, max_batch_time 2 ms), parallel_workers 0;
    V2 REST JSON and V2 gRPC."""

    name: str = "mlserver"
    label: str = f"MLServer {MLSERVER_VERSION} (custom ORT runtime, adaptive batching)"
    version: str = MLSERVER_VERSION
    package: str = "mlserver"

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        from bench.contenders import Served
        from deploy.process import free_port

        peer, stamp, log = self._prepare(model, ctx)
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        repo = write_mlserver_repo(
            peers_root(ctx) / "run" / f"mlserver-{model.architecture}", Path(model.onnx_path), http_port, grpc_port,
            metrics_port,
        )  # fmt: skip
        env = {"PYTHONPATH": str(ALTERNATIVES_DIR), ONNX_PATH_ENV: str(model.onnx_path)}  # imports mlserver_runtime
        base = f"http://127.0.0.1:{http_port}"
        argv = [str(peer.bin / "mlserver"), "start", str(repo)]
        with _peer_process(argv, f"{base}/v2/models/{MODEL_NAME}/ready", log, env, cwd=repo) as pid:
            yield Served(
                _v2_endpoints(base, grpc_port, ctx),
                pid,
                log,
                (
                    _versions_note(peer, stamp, ("fastapi", "uvicorn", "grpcio")),
                    "custom runtime mlserver_runtime.OrtDigits (MLModel: NumpyCodec decode, ORT session.run, "
                    "ORT default session options); adaptive batching max_batch_size 64, max_batch_time 2 ms "
                    "(model-settings.json)",
                    "parallel_workers 0: inference runs in the server's main process (no inference worker pool); "
                    "debug false (no per-request access log); Prometheus metrics endpoint on (MLServer's default)",
                ),
            )


# --- KServe -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KServePeer(_VenvPeer):
    """`kserve.ModelServer` with a `kserve.Model` running ORT; V2 REST JSON and V2 gRPC, one worker."""

    name: str = "kserve"
    label: str = f"KServe {KSERVE_VERSION} ModelServer (ORT model)"
    version: str = KSERVE_VERSION
    package: str = "kserve"

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        from bench.contenders import Served
        from deploy.process import free_port

        peer, stamp, log = self._prepare(model, ctx)
        http_port, grpc_port = free_port(), free_port()
        argv = [
            str(peer.interpreter), str(ALTERNATIVES_DIR / "kserve_app.py"), "--onnx", str(model.onnx_path),
            "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--workers", "1",
            "--enable_latency_logging", "false", "--quiet-requests",
        ]  # fmt: skip
        base = f"http://127.0.0.1:{http_port}"
        with _peer_process(argv, f"{base}/v2/models/{MODEL_NAME}/ready", log, {}) as pid:
            yield Served(
                _v2_endpoints(base, grpc_port, ctx),
                pid,
                log,
                (
                    _versions_note(peer, stamp, ("fastapi", "uvicorn", "grpcio")),
                    "kserve.Model subclass: ORT session.run on the InferRequest's input (ORT default session "
                    "options), one worker, no batching (KServe batches only with its agent sidecar)",
                    "no log line per request (uvicorn access log, KServe's timing and latency lines, gRPC interceptor "
                    "line); KServe binds 0.0.0.0 / [::] itself (not configurable); Prometheus /metrics on (default)",
                ),
            )


# --- LitServe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LitServePeer(_VenvPeer):
    """LitServe with batching (max_batch_size 64, batch_timeout 2 ms); a `LitAPI` that takes
    and answers V2-shaped JSON at /v2/models/digits/infer; REST only."""

    name: str = "litserve"
    label: str = f"LitServe {LITSERVE_VERSION} (ORT LitAPI, batching)"
    version: str = LITSERVE_VERSION
    package: str = "litserve"

    @contextmanager
    def serve(self, model: PreparedModel, ctx: ServeContext) -> Iterator[Served]:
        from bench.contenders import Endpoint, Served
        from bench.payloads import to_v2_json
        from deploy.process import free_port

        peer, stamp, log = self._prepare(model, ctx)
        port = free_port()
        argv = [
            str(peer.interpreter), str(ALTERNATIVES_DIR / "litserve_app.py"), "--onnx", str(model.onnx_path),
            "--port", str(port), "--max-batch-size", str(MAX_BATCH_SIZE), "--batch-timeout", str(MAX_BATCH_TIME_S),
        ]  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        with _peer_process(argv, f"{base}/health", log, {}) as pid:
            yield Served(
                (Endpoint("rest-json", base + V2_INFER, to_v2_json(ctx.rows)),),
                pid,
                log,
                (
                    _versions_note(peer, stamp, ("fastapi", "uvicorn")),
                    "LitAPI: V2-shaped JSON in and out (decode_request / encode_response), ORT session.run on the "
                    "stacked batch (ORT default session options); max_batch_size 64, batch_timeout 2 ms; "
                    "1 inference worker (workers_per_device 1, CPU) behind 1 API server process; uvicorn access "
                    "log off; REST only (LitServe has no gRPC)",
                ),
            )


def peer_contenders() -> list:
    """The three V2 peers, in the order the report lists them."""
    return [MLServerPeer(), KServePeer(), LitServePeer()]
