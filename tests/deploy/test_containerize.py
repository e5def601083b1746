"""deploy/containerize.py: the image tag, the size report, and the exact Dockerfile `canary
containerize` builds for a real Bento (rendered without an engine). The build itself, on the
real engine: tests/deploy/test_container_image.py."""

from __future__ import annotations

import re

import pytest

from deploy.containerize import ImageReport, image_tag, rendered_containerfile
from deploy.image_settings import ImageSettings
from models.errors import CanaryError


def test_the_image_is_tagged_with_the_bentos_version_under_the_configured_repository():
    assert image_tag("digits-service:v3") == "digits-service:v3"
    assert image_tag("digits-service:v3", "registry.example/team/digits") == "registry.example/team/digits:v3"
    for bad in ("digits-service", "digits-service:latest", "other-service:v3"):
        with pytest.raises(CanaryError, match="^expected a built Bento tag like digits-service:v3, got"):
            image_tag(bad)


def test_the_size_report_says_whether_the_image_is_within_its_target_and_lists_the_big_layers():
    report = ImageReport(
        "digits-service:v3", "bento-canary-base:bookworm", 387.4, ((265.0, "RUN venv"), (122.0, "base"), (0.01, "ENV"))
    )
    assert report.lines(400) == [
        "digits-service:v3: 387 MB (within the 400 MB target), base bento-canary-base:bookworm",
        "   265.0 MB  RUN venv",
        "   122.0 MB  base",
    ]
    assert report.lines(300)[0].startswith("digits-service:v3: 387 MB (OVER the 300 MB target)")


@pytest.mark.slow
def test_the_built_bentos_dockerfile_is_offline_slim_non_root_with_three_ports_and_a_healthcheck(built_pipeline):
    dockerfile = rendered_containerfile(built_pipeline.bento_tag).replace("\\\n", " ")  # join continued lines
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if re.match(r"^[A-Z]+\s", line)]
    users = [arg for op, arg in instructions if op == "USER"]
    assert users == ["1034:1034"]  # numeric: a kubelet checks runAsNonRoot without knowing names
    (exposed,) = [arg.split() for op, arg in instructions if op == "EXPOSE"]
    assert set(exposed) == {"3000", "8000", "50051"}
    (healthcheck,) = [arg for op, arg in instructions if op == "HEALTHCHECK"]
    assert re.search(r"CMD .*http://127\.0\.0\.1:3000/v2/health/ready", healthcheck)
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert base == ImageSettings().debian_base  # base `auto` shows the Debian-built one
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "--no-index" in runs and "--find-links /wheels" in runs  # installs from the wheelhouse only
    assert not re.search(r"apt-get|build-essential|gcc|curl|wget|https?://", runs)  # no downloads, no compiler
    assert any(op == "ENV" and arg.startswith("CANARY_SERVICE_GRPC_HOST=") for op, arg in instructions)


def test_rendering_an_unknown_bento_is_one_line(canary_home):
    with pytest.raises(CanaryError, match=r"^Bento digits-service:v999 is not built: run `canary build` first$"):
        rendered_containerfile("digits-service:v999")
