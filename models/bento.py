"""Build the serving Bento for one registry version and export its archive to `bentos/`."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from models.errors import CanaryError
from models.home import REPO_ROOT, CanaryHome
from models.pipeline import Say, _quiet, resolve_stored

BENTOFILE = REPO_ROOT / "bentofile.yaml"
FORBIDDEN_IN_BENTO = ("torch", "mlflow")


@dataclass(frozen=True)
class BuildResult:
    tag: str
    model_tag: str
    archive: Path
    archive_bytes: int
    requirements: tuple[str, ...]


def bento_requirements(bento_path: Path) -> tuple[str, ...]:
    req = bento_path / "env" / "python" / "requirements.txt"
    if not req.is_file():
        return ()
    lines = (line.strip() for line in req.read_text().splitlines())
    return tuple(line for line in lines if line and not line.startswith(("#", "-")))


def build_bento(
    home: CanaryHome, version: int | None = None, alias: str | None = None, say: Say = _quiet
) -> BuildResult:
    """`bentofile.yaml` + the stored model of a version -> Bento `digits-service:v<N>` + archive."""
    import bentoml
    from bentoml.exceptions import NotFound

    ref, stored = resolve_stored(home, version, alias)
    try:  # before the build: a folder that cannot be written fails in a line, not after a minute
        home.bentos_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CanaryError(f"cannot write Bento archives to {home.bentos_dir}: {exc.strerror}") from None
    bento_version = f"v{ref.version}"
    say(f"building the Bento for {stored.tag} from {BENTOFILE.name}")
    try:
        bentoml.bentos.delete(f"digits-service:{bento_version}")
    except NotFound:
        pass
    # BentoML imports the service to find its models, and the service reads the model tag
    # (a Bento argument) at import: a second build in one process would reuse the first
    # build's module and pack the first build's model. Forget it so each build imports afresh.
    for name in [m for m in sys.modules if m == "service" or m.startswith("service.")]:
        del sys.modules[name]
    # BentoML 1.4.39 refuses a dockerfile_template outside the current directory.
    with contextlib.chdir(REPO_ROOT):
        bento = bentoml.bentos.build_bentofile(
            str(BENTOFILE),
            build_ctx=str(REPO_ROOT),
            version=bento_version,
            args={"model_tag": stored.tag},
            labels={"model_version": str(ref.version), "model_sha256": stored.labels["sha256"], "run_id": ref.run_id},
        )
    requirements = bento_requirements(Path(bento.path))
    heavy = [
        r for r in requirements if r.split("=")[0].split("<")[0].split(">")[0].strip().lower() in FORBIDDEN_IN_BENTO
    ]
    if heavy:
        bentoml.bentos.delete(str(bento.tag))
        raise CanaryError(f"the Bento would carry {', '.join(heavy)}; serving needs onnxruntime only")
    archive = home.bentos_dir / f"digits-service-{bento_version}.bento"
    archive.unlink(missing_ok=True)
    bentoml.bentos.export_bento(bento.tag, str(archive))
    size = archive.stat().st_size
    shown = archive.relative_to(REPO_ROOT) if archive.is_relative_to(REPO_ROOT) else archive  # a home elsewhere
    say(f"built {bento.tag} ({size / 1e6:.2f} MB archive at {shown})")
    return BuildResult(str(bento.tag), stored.tag, archive, size, requirements)


def find_bento(home: CanaryHome, ref: str) -> tuple[str, str]:
    """A release reference -> (Bento tag, model version). `ref` is a registry version
    number ("3"), an alias ("@champion") or a Bento tag ("digits-service:v3")."""
    import bentoml
    from bentoml.exceptions import NotFound

    from models.registry import Registry

    home.require()
    if ":" in ref:
        tag = ref
    else:
        registry = Registry(home)
        mv = registry.resolve(alias=ref[1:]) if ref.startswith("@") else registry.resolve(version=_version_number(ref))
        tag = f"digits-service:v{mv.version}"
    try:
        bento = bentoml.bentos.get(tag)
    except NotFound:
        wanted = tag.rsplit(":v", 1)[-1]
        raise CanaryError(f"Bento {tag} is not built: run `canary build --version {wanted}` first") from None
    model_version = bento.info.labels.get("model_version")
    if not model_version:
        raise CanaryError(f"Bento {tag} has no model_version label; build it with `canary build`")
    return str(bento.tag), str(model_version)


def _version_number(ref: str) -> int:
    if not ref.isdigit():
        raise CanaryError(f"{ref!r} is not a model version, @alias or Bento tag (e.g. 3, @champion, digits-service:v3)")
    return int(ref)
