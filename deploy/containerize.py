"""`canary containerize`: a built Bento -> the image `digits-service:v<N>`, built offline.

Why not `bentoml containerize`: BentoML 1.4's Dockerfile installs uv and bentoml with pip
inside the build (`pip install uv`, then its install.sh), which needs a package registry
from inside a container; its build context is a fresh copy of the Bento that takes no
wheelhouse unless ~75 MB of wheels are packed into every Bento; and it runs the first
`docker` on PATH, which on some machines lacks the buildx plugin its BuildKit build needs.
So the Dockerfile is canary's own (deploy/docker/Dockerfile.j2, BentoML's conventions: user
`bentoml` uid 1034, the Bento at /home/bentoml/bento, `bentoml serve` as entrypoint), the
context is made here (the Bento; its models resolved from the model store the way
`bentoml containerize` does; the wheelhouse hard-linked) and the build is the engine's own
(`docker build` with BuildKit, or `podman build --format docker`, which keeps HEALTHCHECK).

Every dependency comes from the wheelhouse (deploy/wheelhouse.py), the base from
`resolve_base` (deploy/base_image.py): the build downloads nothing.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from deploy.base_image import resolve_base
from deploy.engine import Engine, find_engine
from deploy.image_settings import ImageSettings
from deploy.wheelhouse import pip_wheel, prepare_wheelhouse
from models.errors import CanaryError
from models.home import REPO_ROOT, CanaryHome

UID = 1034  # BentoML's `bentoml` user; deploy/k8s and deploy/compose run the slots as it
PYTHON = "3.11"  # the project's Python (pyproject.toml): the Bento's wheels are cp311
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile.j2"


@dataclass(frozen=True)
class ImageReport:
    """What `containerize` built: the image, its base, its size and its largest layers."""

    image: str
    base: str
    size_mb: float
    layers: tuple[tuple[float, str], ...]  # (MB, the instruction that made it), largest first

    def lines(self, target_mb: int) -> list[str]:
        verdict = "within" if self.size_mb <= target_mb else "OVER"
        lines = [f"{self.image}: {self.size_mb:.0f} MB ({verdict} the {target_mb} MB target), base {self.base}"]
        lines += [f"  {mb:6.1f} MB  {what}" for mb, what in self.layers if mb >= 0.1]
        return lines


def image_tag(bento_tag: str, repository: str = "digits-service") -> str:
    """`digits-service:v3` -> the image `<repository>:v3` (the Bento's version is the tag)."""
    name, _, version = bento_tag.partition(":")
    if name != "digits-service" or not version or version == "latest":
        raise CanaryError(f"expected a built Bento tag like digits-service:v3, got {bento_tag!r}")
    return f"{repository}:{version}"


def render_dockerfile(bento_tag: str, base: str, pip_wheel_name: str) -> str:
    """The Dockerfile for `bento_tag` on `base` (pure apart from reading the Bento's info)."""
    env = {str(key): str(value) for key, value in (_bento(bento_tag).info.docker.env or {}).items()}
    template = jinja2.Environment(loader=jinja2.FileSystemLoader(DOCKERFILE.parent), autoescape=False,  # noqa: S701  # nosec B701 - a Dockerfile, not HTML
                                  keep_trailing_newline=True, undefined=jinja2.StrictUndefined)  # fmt: skip
    return template.get_template(DOCKERFILE.name).render(
        bento=bento_tag, base=base, pip_wheel=pip_wheel_name, uid=UID, env=env
    )


def rendered_containerfile(bento_tag: str, settings: ImageSettings | None = None) -> str:
    """The Dockerfile `canary containerize --dry-run` shows (no engine, nothing downloaded).
    With base `auto` it shows the Debian-built base, the one used where no official image is."""
    settings = settings or ImageSettings()
    base = {"auto": settings.debian_base, "debian": settings.debian_base, "official": settings.official_base}
    return render_dockerfile(bento_tag, base.get(settings.base, settings.base), _host_pip_wheel())


def containerize(
    home: CanaryHome, bento_tag: str, settings: ImageSettings | None = None, engine: Engine | None = None,
    say=lambda line: None,
) -> ImageReport:  # fmt: skip
    """Build the image of a built Bento; progress goes to `say` and stderr."""
    settings = settings or ImageSettings()
    image = image_tag(bento_tag, settings.repository)
    bento = _bento(bento_tag)
    engine = engine or find_engine(home, say=say)
    say(f"engine: {engine.describe()}")
    base = resolve_base(engine, home, settings, say)
    cache = settings.cache_dir(home)
    wheels = prepare_wheelhouse(_requirements(Path(bento.path)), base_python(engine, base), cache, say)
    context = cache / "contexts" / image.replace(":", "-").replace("/", "-")
    shutil.rmtree(context, ignore_errors=True)
    previous = None
    try:
        _make_context(context, bento_tag, Path(bento.path), wheels)
        (context / "Dockerfile").write_text(render_dockerfile(bento_tag, base, pip_wheel(wheels)))
        say(f"building {image} on {base} with {engine.kind} (no downloads)")
        previous = _image_id(engine, image)
        _build(engine, context, image)
    finally:
        shutil.rmtree(context, ignore_errors=True)
    if previous and previous != _image_id(engine, image):  # the image this tag named before, now untagged
        subprocess.run([engine.client, "image", "rm", previous], capture_output=True, check=False)
    return inspect_image(engine, image, base)


def base_python(engine: Engine, base: str) -> str:
    """The exact Python version of `base` (the wheelhouse is resolved for it)."""
    script = "import platform; print(platform.python_version())"
    version = engine.run(
        "run", "--rm", "--entrypoint", "python3", base, "-c", script, what=f"python3 in {base}"
    ).strip()
    if not version.startswith(PYTHON + "."):
        raise CanaryError(f"the base {base} has Python {version}; the serving image needs Python {PYTHON}")
    return version


def inspect_image(engine: Engine, image: str, base: str) -> ImageReport:
    size = int(engine.run("image", "inspect", "--format", "{{.Size}}", image).strip()) / 1e6
    history = engine.run("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    layers = []
    for line in history.splitlines():
        text, _, created_by = line.partition("\t")
        layers.append((_mb(text), _instruction(created_by)))
    return ImageReport(image, base, size, tuple(sorted(layers, key=lambda layer: -layer[0])))


def _image_id(engine: Engine, image: str) -> str | None:
    done = subprocess.run([engine.client, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True,
                          text=True, check=False)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else None


def _build(engine: Engine, context: Path, image: str) -> None:
    argv = [engine.client, "build", "--tag", image, "--file", str(context / "Dockerfile")]
    if engine.kind == "docker":
        argv += ["--progress", "plain"]
    else:  # podman writes OCI images by default, and OCI has no HEALTHCHECK
        argv += ["--format", "docker"]
    run = subprocess.run([*argv, str(context)], env=engine.env(), stdout=sys.stderr, stderr=subprocess.STDOUT,
                         check=False)  # fmt: skip
    if run.returncode != 0:
        raise CanaryError(f"building {image} failed with exit code {run.returncode} (output above)")


def _make_context(context: Path, bento_tag: str, bento_path: Path, wheels: Path) -> None:
    """context/bento: the Bento with its models; context/wheels: the wheelhouse (hard links)."""
    from _bentoml_sdk.models import BentoModel
    from bentoml._internal.bento.bento import BaseBentoInfo

    shutil.copytree(bento_path, context / "bento", ignore=shutil.ignore_patterns("__pycache__"))
    with open(bento_path / "bento.yaml", "rb") as handle:
        info = BaseBentoInfo.from_yaml_file(handle)
    for model in info.all_models:  # as `bentoml containerize` does: a store of its own in the Bento
        if model.registry == "huggingface":
            raise CanaryError(
                f"{bento_tag} needs Hugging Face model {model.tag}; canary containerizes stored models only"
            )
        BentoModel.from_info(model).resolve(context / "bento" / "models")
    # The image's files belong to root and are readable by all: the server (uid 1034) reads
    # them, never writes them. The model store keeps its files 0600.
    for path in (context / "bento").rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (context / "wheels").mkdir()
    for wheel in wheels.iterdir():
        try:
            os.link(wheel, context / "wheels" / wheel.name)
        except OSError:  # another filesystem
            shutil.copy2(wheel, context / "wheels" / wheel.name)


def _bento(bento_tag: str):
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.bentos.get(bento_tag)
    except NotFound:
        raise CanaryError(f"Bento {bento_tag} is not built: run `canary build` first") from None


def _requirements(bento_path: Path) -> tuple[str, ...]:
    from models.bento import bento_requirements

    requirements = bento_requirements(bento_path)
    if not requirements:
        raise CanaryError(f"the Bento at {bento_path} lists no Python requirements (env/python/requirements.txt)")
    return requirements


def _host_pip_wheel() -> str:
    """pip's wheel as the wheelhouse names it: pinned to this environment's pip."""
    return f"pip-{importlib.metadata.version('pip')}-py3-none-any.whl"


def _mb(text: str) -> float:
    units = {"kB": 1e-3, "KB": 1e-3, "MB": 1.0, "GB": 1e3, "B": 1e-6}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * factor
            except ValueError:
                return 0.0
    return 0.0


def _instruction(created_by: str) -> str:
    """A layer's instruction, short: `RUN python3 -m venv ...`, `COPY bento ...`."""
    text = " ".join(created_by.replace("/bin/sh -c #(nop) ", "").replace("|0 /bin/sh -c ", "RUN ").split())
    text = text.removeprefix("/bin/sh -c ")
    if not text:
        return "(base image layer)"
    return text if len(text) <= 90 else text[:87] + "..."
