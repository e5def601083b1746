"""Session fixtures for the real pipeline: one trained, exported and built digits-cnn."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from models.home import CanaryHome
from tests.support.redis_server import RedisProcess

EPOCHS = 3  # small budget: ~90% test accuracy, a few seconds


@dataclass(frozen=True)
class BuiltPipeline:
    version: int
    run_id: str
    sha256: str
    bento_tag: str
    archive_bytes: int
    requirements: tuple[str, ...]
    aliases: tuple[str, ...] = ()  # the registry aliases it got when it was registered


@pytest.fixture(scope="session")
def built_pipeline(canary_home: CanaryHome) -> BuiltPipeline:
    from models.bento import build_bento
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    trained = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=EPOCHS, seed=0))
    exported = export_version(canary_home, version=trained.ref.version)
    built = build_bento(canary_home, version=trained.ref.version)
    return BuiltPipeline(
        trained.ref.version,
        trained.ref.run_id,
        exported.sha256,
        built.tag,
        built.archive_bytes,
        built.requirements,
        tuple(trained.ref.aliases),
    )


@dataclass(frozen=True)
class ServedBento:
    url: str  # BentoML's REST base URL (native API, /metrics, V2 mounted)
    grpc: str  # host:port of the V2 gRPC server
    redis: RedisProcess  # the response cache's real redis-server
    v2: str  # base URL of the Bento's own V2 REST listener (the hot path)

    def rest(self, listener: str) -> str:
        """Base URL of a REST listener by name: "bentoml" or "v2"."""
        return self.url if listener == "bentoml" else self.v2


REST_LISTENERS = ("bentoml", "v2")


@pytest.fixture(scope="session")
def session_redis() -> Iterator[RedisProcess]:
    with RedisProcess() as server:
        yield server


@pytest.fixture(scope="session")
def serving(
    built_pipeline: BuiltPipeline, canary_home: CanaryHome, session_redis: RedisProcess
) -> Iterator[ServedBento]:
    """A real `bentoml serve` of the built Bento (REST + gRPC on free ports, Redis cache on)."""
    from deploy.process import free_port, served_bento

    grpc_port, rest_port = free_port(), free_port()
    env = {
        "CANARY_SERVICE_GRPC_PORT": str(grpc_port),
        "CANARY_SERVICE_REST_PORT": str(rest_port),
        "CANARY_SERVICE_CACHE_URL": session_redis.url,
        "CANARY_SERVICE_SLOT": "test",
        # the prediction log (and feedback) on, as in the stack: every test's traffic is logged
        "CANARY_SERVICE_PREDICTION_LOG_URL": session_redis.url,
        "CANARY_SERVICE_PREDICTION_LOG_FLUSH_INTERVAL_S": "0.1",
        "CANARY_SERVICE_PREDICTION_LOG_INPUTS": "true",  # so logged traffic can be replayed
    }
    with served_bento(built_pipeline.bento_tag, free_port(), canary_home.logs / "test-serve.log", env) as base:
        yield ServedBento(base, f"127.0.0.1:{grpc_port}", session_redis, f"http://127.0.0.1:{rest_port}")


@pytest.fixture(scope="session")
def served(serving: ServedBento) -> str:
    """The REST base URL of the served Bento."""
    return serving.url


@dataclass(frozen=True)
class SecondVersion:
    """Another registry version (the scikit-learn model) served from the same Bento with a
    long batching window, 300 ms injected per batch and a small queue: batches form
    deterministically and overload is easy to reach."""

    version: int
    url: str
    grpc: str


SLOW_WINDOW_MS = 400
SLOW_BATCH_MS = 300  # injected per-batch latency: the model stays busy long enough to queue


@pytest.fixture(scope="session")
def second_version(
    built_pipeline: BuiltPipeline, canary_home: CanaryHome, session_redis: RedisProcess
) -> Iterator[SecondVersion]:
    from deploy.process import free_port, served_bento
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    trained = train_and_register(canary_home, TrainConfig(model="digits-linear", epochs=5, seed=0))
    exported = export_version(canary_home, version=trained.ref.version)
    grpc_port = free_port()
    env = {
        "CANARY_SERVICE_MODEL_TAG": exported.stored.tag,
        "CANARY_SERVICE_GRPC_PORT": str(grpc_port),
        "CANARY_SERVICE_CACHE_URL": session_redis.url,
        "CANARY_SERVICE_MAX_LATENCY_MS": str(SLOW_WINDOW_MS),
        "CANARY_SERVICE_MAX_BATCH_SIZE": "64",
        "CANARY_SERVICE_MAX_ROWS_PER_REQUEST": "64",
        "CANARY_SERVICE_MAX_QUEUE_ROWS": "128",
        "CANARY_SERVICE_SLOT": "second",
        "CANARY_SERVICE_FAULT_LATENCY_MS": str(SLOW_BATCH_MS),
    }
    log = canary_home.logs / "test-serve-second.log"
    with served_bento(built_pipeline.bento_tag, free_port(), log, env) as base:
        yield SecondVersion(trained.ref.version, base, f"127.0.0.1:{grpc_port}")
