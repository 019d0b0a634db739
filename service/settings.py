"""Server configuration: CLI flags and `POD_*` environment variables (flags win), printed at start."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pod.recommender import TOPN_PROMPT_HELP, DecodingConfig
from service.schemas import MAX_LIST


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POD_", extra="ignore")

    bundle: str | None = Field(None, description="export bundle directory (ONNX runtime)")
    runtime: Literal["onnx", "torch"] = "onnx"
    checkpoint: str | None = Field(None, description="checkpoint directory (PyTorch runtime)")
    provider: str = Field("auto", description="ONNX Runtime provider: auto, cpu or cuda")
    device: str = Field("auto", description="PyTorch device: auto, cpu or cuda")
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0)
    max_queue: int = Field(256, ge=1, description="per task; a full queue answers 429")
    max_in_flight: int = Field(
        0,
        ge=0,
        description="per task: requests past the door and not yet answered; past it, 429 before the body is "
        "read (0: no limit but the queue's)",
    )
    request_timeout_s: float = Field(10.0, gt=0, description="per-request deadline; past it, 504")
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    max_history: int = Field(
        MAX_LIST, ge=1, le=MAX_LIST, description="longest history accepted (the model reads the last 20)"
    )
    beams: int = Field(DecodingConfig.beams, ge=1, le=100)
    explanation_beams: int = Field(DecodingConfig.explanation_beams, ge=1)
    explanation_groups: int = Field(DecodingConfig.explanation_groups, ge=1)
    diversity_penalty: float = DecodingConfig.diversity_penalty
    no_repeat_ngram: int = Field(
        DecodingConfig.no_repeat_ngram, ge=0, description="explanations: no n-gram twice in a sentence (0: off)"
    )
    normalizer: Literal["exact", "allowed"] = Field(
        "exact",
        description="item scores: exact log-probabilities (the paper's ranking), or renormalized over the tokens "
        "the ID trie allows (faster: forced tokens and the final end-of-ID step cost nothing)",
    )
    topn_prompt: Literal["auto", "topn", "sequential"] = Field(
        DecodingConfig.topn_prompt,
        description=TOPN_PROMPT_HELP,
    )
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: its default)")
    availability_file: str | None = Field(
        None, description="JSON list of unavailable item IDs kept across restarts (POST /admin/availability writes it)"
    )
    warmup: bool = True
    log_level: str = "info"
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans over OTLP/HTTP to $OTEL_EXPORTER_OTLP_ENDPOINT (see service/tracing.py)",
    )
    # A secret: printed as ********** and never logged; prefer the environment to a flag (ps shows flags).
    api_token: SecretStr | None = Field(
        None, description="bearer token the recommendation endpoints require (health, metrics and docs stay open)"
    )
