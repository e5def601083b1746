"""The local stack's Redis on its own (no slots, no nginx): it demands the password the stack
generated, which lives only in 0600 files and never on a command line."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from deploy.process import free_port
from deploy.stack import LocalStack, StackSettings
from models.home import CanaryHome
from service.core.cache import RedisCache


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(CanaryHome(home=tmp_path / "home"), StackSettings(name="redis-test", redis_port=free_port()))
    stack.start_redis()
    yield stack
    stack.down()


def client(stack: LocalStack, password: str | None) -> redis.Redis:
    """A plain client; no retries (redis-py retries a refused AUTH with backoff by default)."""
    return redis.Redis(
        host="127.0.0.1",
        port=stack.settings.redis_port,
        password=password,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )


def test_the_stacks_redis_refuses_clients_without_the_password(stack: LocalStack) -> None:
    password, _ = stack.cache_secrets()
    for wrong in (None, "not-the-password"):
        with client(stack, wrong) as outsider, pytest.raises(redis.AuthenticationError):
            outsider.set("canary:v2:digits:1:x", b"chosen answer")
    with client(stack, password) as insider:
        assert insider.ping() and insider.dbsize() == 0
    anonymous = RedisCache(stack.redis_url, connect_timeout_s=0.5, read_timeout_s=0.5)
    trusted = RedisCache(stack.redis_url, password=password, connect_timeout_s=0.5, read_timeout_s=0.5)
    anonymous.put_many([("k", b"v")])
    trusted.put_many([("k2", b"v2")])
    assert (anonymous.get_many(["k2"]), trusted.get_many(["k", "k2"])) == ([None], [None, b"v2"])
    for cache in (anonymous, trusted):
        cache.close()


def test_secrets_are_0600_files_kept_across_restarts_and_off_the_command_line(stack: LocalStack) -> None:
    secrets = stack.cache_secrets()
    config = stack.run_dir / "redis" / "redis.conf"
    for path in (stack.redis_password_file, stack.cache_key_file, config):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert len(set(secrets)) == 2 and all(len(secret) >= 32 for secret in secrets)
    info = stack.process("redis")
    assert info.alive and info.pid is not None  # the pid file's marker still matches
    assert secrets[0].encode() not in Path(f"/proc/{info.pid}/cmdline").read_bytes()
    stack.down()
    stack.start_redis()
    assert stack.cache_secrets() == secrets
    with client(stack, secrets[0]) as insider:
        assert insider.ping()
