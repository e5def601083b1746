"""`canary containerize`: a built Bento -> the OCI image `digits-service:v<N>`.

A thin wrapper around `bentoml containerize` that first finds a container engine that
actually answers (a docker CLI without a running daemon does not count) and says in one
line what to install when there is none. The Dockerfile is BentoML's own plus
deploy/docker/Dockerfile.template (bentofile.yaml `docker.dockerfile_template`):
`rendered_containerfile` shows it without any engine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from deploy.process import venv_bin
from models.errors import CanaryError

IMAGE_REPOSITORY = "digits-service"
INSTALL_HINT = (
    "install and start Docker Engine (https://docs.docker.com/engine/install/), "
    "or install Podman (apt-get install podman), then run again"
)


class Engine(NamedTuple):
    """A build backend of `bentoml containerize` and the command that proves it works."""

    backend: str
    probe: tuple[str, ...]
    options: tuple[str, ...] = ()


ENGINES = (
    Engine("docker", ("docker", "info")),
    # Podman builds OCI images by default, and the OCI format has no HEALTHCHECK.
    Engine("podman", ("podman", "info"), ("--opt", "format=docker")),
    # A buildkitd (BUILDKIT_HOST) with buildctl; bentoml then exports the image to a tarball.
    Engine("buildctl", ("buildctl", "debug", "workers")),
)


def find_engine(engines: Sequence[Engine] = ENGINES, timeout_s: float = 20.0) -> Engine:
    """The first engine whose probe succeeds; else a one-line `CanaryError` naming why each failed."""
    failures = []
    for engine in engines:
        binary = shutil.which(engine.probe[0])
        if binary is None:
            failures.append(f"{engine.probe[0]} not installed")
            continue
        try:
            probe = subprocess.run(
                [binary, *engine.probe[1:]], capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            failures.append(f"{engine.probe[0]} did not answer within {timeout_s:g}s")
            continue
        if probe.returncode == 0:
            return engine
        failures.append(f"{engine.probe[0]}: {_last_line(probe.stderr or probe.stdout)}")
    raise CanaryError(f"no container engine found (docker, podman or buildkit): {'; '.join(failures)}; {INSTALL_HINT}")


def image_tag(bento_tag: str) -> str:
    """`digits-service:v3` -> the image `digits-service:v3` (the Bento's version is the tag)."""
    name, _, version = bento_tag.partition(":")
    if name != IMAGE_REPOSITORY or not version or version == "latest":
        raise CanaryError(f"expected a built Bento tag like {IMAGE_REPOSITORY}:v3, got {bento_tag!r}")
    return f"{IMAGE_REPOSITORY}:{version}"


def containerize(bento_tag: str, engine: Engine | None = None) -> str:
    """Build the image of a built Bento with the first working engine; returns the image tag.

    BentoML's build output goes to stderr, so stdout stays for the result line.
    """
    image = image_tag(bento_tag)
    engine = engine or find_engine()
    argv = [venv_bin("bentoml"), "containerize", bento_tag, "--image-tag", image, "--backend", engine.backend,
            *engine.options]  # fmt: skip
    env = dict(os.environ)
    if env.get("BENTOML_HOME"):  # the working directory changes below
        env["BENTOML_HOME"] = str(Path(env["BENTOML_HOME"]).resolve())
    run = subprocess.run(argv, cwd=_template_cwd(), env=env, stdout=sys.stderr, check=False)
    if run.returncode != 0:
        raise CanaryError(f"bentoml containerize {bento_tag} failed with exit code {run.returncode} (output above)")
    return image


def rendered_containerfile(bento_tag: str) -> str:
    """The exact Dockerfile `bentoml containerize` builds for a Bento (no engine needed)."""
    import bentoml
    from bentoml.exceptions import NotFound

    with tempfile.TemporaryDirectory(prefix="canary-containerfile-") as out, contextlib.chdir(_template_cwd()):
        path = Path(out) / "Dockerfile"
        try:
            bentoml.container.get_containerfile(bento_tag, output_path=str(path))
        except NotFound:
            raise CanaryError(f"Bento {bento_tag} is not built: run `canary build` first") from None
        return path.read_text()


def _template_cwd() -> str:
    """Where to containerize from. BentoML 1.4.39 renders a Bento's `dockerfile_template`
    from a copy in a fresh temporary folder and refuses a template outside the working
    directory (bentoml/BentoML#5566), so work from the temporary folders' root."""
    return tempfile.gettempdir()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "failed"
    return line.removeprefix("ERROR: ").removeprefix("Error: ")[:200]
