"""deploy/engine.py without an engine: which docker client is taken (stand-in clients for
what this machine cannot show at will: a client without buildx, a daemon that is down), the
one-line refusal when no engine answers, and the pid record of a started dockerd. The real
engine, started when none runs: tests/support/containers.py and the container tests."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from deploy import engine as engine_module
from deploy.engine import INSTALL_HINT, DaemonRecord, EngineSettings, docker_client, find_engine, probe_engine
from models.errors import CanaryError
from models.home import CanaryHome

CLIENT = textwrap.dedent(
    """\
    #!/bin/sh
    # a docker client: version {version}, buildx {buildx}, server {server}
    case "$1 $2" in
      "buildx version") [ "{buildx}" = yes ] || exit 1 ;;
      "version --format") [ "$3" = "{{{{.Client.Version}}}}" ] && echo "{version}" && exit 0
          [ "{server}" != down ] && echo "{server}" && exit 0
          echo "Cannot connect to the Docker daemon at unix:///nowhere.sock. Is the docker daemon running?" >&2
          exit 1 ;;
    esac
    """
)


def client(folder: Path, version: str, buildx: bool, server: str = "down") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docker"
    path.write_text(CLIENT.format(version=version, buildx="yes" if buildx else "no", server=server))
    path.chmod(0o755)
    return path


@pytest.fixture
def only(tmp_path, monkeypatch):
    """PATH holds only the stand-ins (and sh); no Debian client unless a test puts one there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(engine_module, "DEBIAN_DOCKER", str(tmp_path / "no-debian-docker"))
    return bin_dir


def test_a_new_client_without_buildx_is_passed_over_for_debians_which_builds_with_buildkit(tmp_path, only, monkeypatch):
    client(only, "28.2.2", buildx=False)
    debian = client(tmp_path / "debian", "20.10.24+dfsg1", buildx=False)
    monkeypatch.setattr(engine_module, "DEBIAN_DOCKER", str(debian))
    assert docker_client(EngineSettings()) == str(debian)
    with_buildx = client(only, "28.2.2", buildx=True)
    assert docker_client(EngineSettings()) == str(with_buildx)


def test_a_running_daemon_is_used_as_it_is(tmp_path, only):
    path = client(only, "20.10.24", buildx=False, server="20.10.24+dfsg1")
    found, reasons = probe_engine(CanaryHome(home=tmp_path / "home"))
    assert found is not None and reasons == []
    assert (found.kind, found.client, found.version, found.started_pid) == ("docker", str(path), "20.10.24+dfsg1", None)
    assert found.describe() == f"docker 20.10.24+dfsg1 (client {path})"
    assert found.env()["DOCKER_BUILDKIT"] == "1" and found.env()["PATH"].startswith(f"{only}:")


def test_no_engine_is_one_line_naming_why_each_one_failed(tmp_path, only):
    client(only, "20.10.24", buildx=False)  # installed, its daemon down, not allowed to start one
    with pytest.raises(CanaryError) as error:
        find_engine(CanaryHome(home=tmp_path / "home"), EngineSettings(autostart=False))
    message = str(error.value)
    assert "\n" not in message
    assert message == (
        "no container engine: docker: Cannot connect to the Docker daemon at unix:///nowhere.sock. Is the docker "
        f"daemon running?; podman: not installed; {INSTALL_HINT}"
    )


def test_the_dockerd_record_claims_only_the_process_it_started(tmp_path):
    home = CanaryHome(home=tmp_path / "home")
    record = DaemonRecord(home)
    fake = tmp_path / "dockerd"  # a process whose command is `dockerd`, standing in for the daemon
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    process = subprocess.Popen([str(fake), "60"])
    try:
        record.save(process.pid)
        assert record.alive_pid() == process.pid
        assert record.stop() is True
        assert process.wait(timeout=10) is not None and record.alive_pid() is None
        other = subprocess.Popen(["sleep", "60"])  # a pid that is not a dockerd is never ours
        try:
            record.save(other.pid)
            assert record.alive_pid() is None and record.stop() is False and other.poll() is None
        finally:
            other.kill()
            other.wait()
    finally:
        process.kill()
        process.wait()
