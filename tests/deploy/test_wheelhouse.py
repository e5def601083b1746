"""deploy/wheelhouse.py: the wheels' own metadata walked with the image's markers, not the
host's (pip's own pass misses `async-timeout` for Debian's Python 3.11.2 on a 3.11.7 host).
The real download and an image installed from it: tests/deploy/test_container_image.py."""

from __future__ import annotations

import zipfile
from pathlib import Path

from deploy.wheelhouse import missing_requirements, target_environment


def wheel(folder: Path, name: str, *requires: str) -> None:
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA", metadata)


def test_markers_are_those_of_the_images_python_and_extras_follow_the_requests(tmp_path):
    wheel(tmp_path, "redis", "async-timeout>=4.0.3; python_full_version < '3.11.3'", "hiredis>=3; extra == 'hiredis'")
    wheel(tmp_path, "tritonclient", "numpy>=1.19", "grpcio>=1.81; extra == 'grpc'", "aiohttp; extra == 'http'")
    wheel(tmp_path, "numpy")
    wanted = ["redis>=5,<9", "tritonclient[grpc]>=2.60", "pywin32; sys_platform == 'win32'"]
    debian = missing_requirements(tmp_path, wanted, target_environment("3.11.2"))
    assert debian == ["async-timeout>=4.0.3", "grpcio>=1.81"]
    assert missing_requirements(tmp_path, wanted, target_environment("3.11.7")) == ["grpcio>=1.81"]
    wheel(tmp_path, "async-timeout")
    wheel(tmp_path, "grpcio", "typing-extensions>=4.12")
    assert missing_requirements(tmp_path, wanted, target_environment("3.11.2")) == ["typing-extensions>=4.12"]
    wheel(tmp_path, "typing-extensions")
    assert missing_requirements(tmp_path, wanted, target_environment("3.11.2")) == []
