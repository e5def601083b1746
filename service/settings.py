"""`ServiceSettings`: every knob of the serving process, read once from the environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CANARY_SERVICE_", extra="ignore", frozen=True)

    model_tag: str | None = Field(
        default=None,
        description="BentoML model tag to serve; overrides the tag baked into the Bento at build time.",
    )
    max_rows_per_request: int = Field(default=1024, ge=1, description="Rows one request may carry.")
    max_body_bytes: int = Field(default=8 << 20, ge=1024, description="Largest accepted request body.")
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads per worker; 0 = cores / workers."
    )
