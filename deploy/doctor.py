"""`canary doctor`: what this machine offers for images and the compose stack, one line each.
Nothing is started or built; each line says what to run when a part is missing."""

from __future__ import annotations

import shutil

from deploy.base_image import image_exists, image_size_mb, registry_reachable
from deploy.engine import EngineSettings, docker_client, probe_engine
from deploy.image_settings import ImageSettings
from models.home import CanaryHome


def doctor_lines(home: CanaryHome) -> list[str]:
    from deploy.compose_cli import compose_command

    settings, images = EngineSettings(), ImageSettings()
    engine, reasons = probe_engine(home, settings)
    if engine:
        lines = [f"engine: {engine.describe()}"]
    elif docker_client(settings) and settings.autostart:
        lines = [
            f"engine: none running ({'; '.join(reasons)}); canary starts {settings.dockerd} when it needs one (root)"
        ]
    else:
        lines = [f"engine: none ({'; '.join(reasons)}); run `make setup` as root"]
    standalone = shutil.which("docker-compose")
    compose = compose_command(engine) if engine else ([standalone] if standalone else None)
    lines.append(f"compose: {' '.join(compose)}" if compose else "compose: none (run `make setup`: docker-compose)")
    registry = "reachable" if registry_reachable(images) else "not reachable (bases are built from Debian packages)"
    lines.append(f"registry: {images.registry_url} {registry}")
    for name in (images.official_base, images.debian_base, images.services_image):
        if engine is None:
            continue
        present = image_exists(engine, name)
        state = f"present, {image_size_mb(engine, name):.0f} MB" if present else "missing"
        hint = "" if present or name == images.official_base else " (run `canary base-image`)"
        lines.append(f"image {name}: {state}{hint}")
    return lines
