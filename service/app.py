"""The Bento's composition root: builds the core from settings and mounts the adapters.

Served as `service.app:DigitsService`. The model tag is a Bento argument baked in by
`canary build` (`bentoml serve service.app:DigitsService --arg model_tag=digits:v1`
works from a checkout); the service imports neither torch nor mlflow.
"""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from bentoml.exceptions import BentoMLException
from http import HTTPStatus
import numpy as np
from pydantic import BaseModel, Field

from service.core.errors import InferenceError
from service.core.inference import InferenceCore
from service.core.model import ModelCard
from service.core.runner import OnnxRunner
from service.settings import ServiceSettings
from service.v2.rest import build_v2_app

log = logging.getLogger("bento_canary.service")
ONNX_FILE = "model.onnx"


class BadInput(BentoMLException):
    error_code = HTTPStatus.BAD_REQUEST


def to_bentoml_error(exc: InferenceError) -> BentoMLException:
    """The native API's side of the one error mapping: same status as V2 REST."""
    error = BentoMLException(str(exc))
    error.error_code = HTTPStatus(exc.http_status)
    return error


class BentoArgs(BaseModel):
    model_tag: str = "digits:latest"


_SETTINGS = ServiceSettings()
_ARGS = bentoml.use_arguments(BentoArgs)
# Stateless until the service instance binds its core in __init__ (BentoML mounts ASGI
# apps when the class is defined, before any instance exists).
v2_app = build_v2_app(max_body_bytes=_SETTINGS.max_body_bytes)


class Classified(BaseModel):
    model_version: str = Field(description="Registry version of the model that answered.")
    classes: list[int] = Field(description="Predicted digit per row.")
    confidences: list[float] = Field(description="Probability of the predicted digit per row.")


@bentoml.asgi_app(v2_app, path="/")
@bentoml.service(name="digits-service", workers=1, traffic={"timeout": 30})
class DigitsService:
    model_ref = bentoml.models.BentoModel(_SETTINGS.model_tag or _ARGS.model_tag)

    def __init__(self) -> None:
        settings = _SETTINGS
        stored = self.model_ref
        card = ModelCard.from_labels(dict(stored.info.labels))
        runner = OnnxRunner(Path(stored.path_of(ONNX_FILE)), card, settings.intra_op_threads)
        self.core = InferenceCore(runner, settings.max_rows_per_request)
        self.core.start()
        v2_app.state.core = self.core
        log.info("serving %s version %s (sha256 %s)", card.name, card.version, card.sha256[:12])

    def __is_ready__(self) -> bool:
        return self.core.ready

    @bentoml.api
    async def classify(self, pixels: list[list[float]]) -> Classified:
        """Classify rows of 64 raw pixel values (0-16, row-major 8x8 images)."""
        try:
            result = await self.core.classify(np.asarray(pixels, dtype=np.float32))
        except InferenceError as exc:
            raise to_bentoml_error(exc) from None
        except ValueError:
            raise BadInput("pixels must be rows of 64 numbers") from None
        return Classified(model_version=self.core.card.version, classes=result.classes, confidences=result.confidences)
