"""Session fixtures for the real pipeline: one trained, exported and built digits-cnn."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from models.home import CanaryHome

EPOCHS = 3  # small budget: ~90% test accuracy, a few seconds


@dataclass(frozen=True)
class BuiltPipeline:
    version: int
    run_id: str
    sha256: str
    bento_tag: str
    archive_bytes: int
    requirements: tuple[str, ...]


@pytest.fixture(scope="session")
def built_pipeline(canary_home: CanaryHome) -> BuiltPipeline:
    from models.bento import build_bento
    from models.pipeline import export_version, train_and_register
    from models.train import TrainConfig

    trained = train_and_register(canary_home, TrainConfig(model="digits-cnn", epochs=EPOCHS, seed=0))
    exported = export_version(canary_home, version=trained.ref.version)
    built = build_bento(canary_home, version=trained.ref.version)
    return BuiltPipeline(
        trained.ref.version, trained.ref.run_id, exported.sha256, built.tag, built.archive_bytes, built.requirements
    )


@pytest.fixture(scope="session")
def served(built_pipeline: BuiltPipeline, canary_home: CanaryHome) -> Iterator[str]:
    """A real `bentoml serve` of the built Bento on a free port; yields its base URL."""
    from deploy.process import free_port, served_bento

    with served_bento(built_pipeline.bento_tag, free_port(), canary_home.logs / "test-serve.log") as base:
        yield base
