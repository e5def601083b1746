"""deploy/base_image.py without an engine: the Debian mirror taken from apt's own sources
(never a fixed host) and the registry probe. Building and using the images, on the real
engine: tests/deploy/test_container_image.py and test_compose_engine.py."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from deploy.base_image import apt_mirror, registry_reachable
from deploy.image_settings import ImageSettings
from deploy.process import free_port
from models.errors import CanaryError


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_the_mirror_comes_from_a_deb822_source_serving_the_suite_with_main(tmp_path):
    root = apt_dir(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main contrib\n"
    )})  # fmt: skip
    assert apt_mirror("bookworm", root) == "http://mirror.example/debian"


def test_the_mirror_comes_from_a_one_line_source_with_options(tmp_path):
    root = apt_dir(tmp_path, {"sources.list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://security.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://list.example/debian bookworm main\n"
    )})  # fmt: skip
    assert apt_mirror("bookworm", root) == "http://list.example/debian"


def test_no_source_for_the_suite_is_one_line_naming_the_setting(tmp_path):
    root = apt_dir(tmp_path, {"sources.list": "deb http://list.example/debian bullseye main\n"})
    with pytest.raises(
        CanaryError, match=r"^no apt source for Debian bookworm \(main\) in .*; set CANARY_IMAGE_MIRROR"
    ):
        apt_mirror("bookworm", root)


class _Unauthorized(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(401)  # what a registry's /v2/ answers without a token
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_registry_counts_as_reachable_when_it_answers_at_all():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v2/"
        assert registry_reachable(ImageSettings(registry_url=url, probe_timeout_s=2))
    finally:
        server.shutdown()
        server.server_close()
    closed = ImageSettings(registry_url=f"http://127.0.0.1:{free_port()}/v2/", probe_timeout_s=2)
    assert not registry_reachable(closed)
