"""Settings of the images canary builds: bases, the serving image's name, caches (env prefix
CANARY_IMAGE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.home import CanaryHome


class ImageSettings(BaseSettings):
    """Where `canary base-image` and `canary containerize` take their bases and keep their caches."""

    model_config = SettingsConfigDict(env_prefix="CANARY_IMAGE_", extra="ignore", frozen=True)

    base: str = Field(
        default="auto", description="Base of the serving image: auto (the official image if present or a "
        "registry answers, else the Debian-built one), official, debian, or any image reference.",
    )  # fmt: skip
    official_base: str = Field(default="python:3.11-slim-bookworm", description="The official slim Python image.")
    debian_base: str = Field(
        default="bento-canary-base:bookworm", description="The base `canary base-image` builds from Debian packages."
    )
    services_image: str = Field(
        default="bento-canary-services:bookworm",
        description="Redis and nginx with Lua from Debian packages, for the compose stack (built by `canary base-image`).",
    )
    repository: str = Field(default="digits-service", description="Repository of the serving images (<repo>:v<N>).")
    suite: str = Field(default="bookworm", description="Debian release the Debian-built images come from.")
    mirror: str = Field(default="", description="Debian mirror for debootstrap; empty: the machine's apt sources.")
    registry_url: str = Field(
        default="https://registry-1.docker.io/v2/", description="Probed to tell whether a registry is reachable."
    )
    probe_timeout_s: float = Field(default=3.0, gt=0, description="How long the registry probe may take.")
    size_target_mb: int = Field(default=400, gt=0, description="`containerize` warns above this image size.")
    cache: Path | None = Field(
        default=None, description="Wheelhouses, debootstrap downloads and build contexts; default <state>/images."
    )

    def cache_dir(self, home: CanaryHome) -> Path:
        return self.cache or home.home / "images"
