"""Request and response bodies (OpenAPI at /docs). IDs are JSON integers (internal indices) or JSON
strings (raw IDs as in the data, e.g. ASINs); a response uses the form the request used."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Id = StrictInt | StrictStr


class SequentialRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    history: list[Id] | None = Field(None, description="items in time order; default: the known history")
    k: int = Field(10, ge=1, le=20)
    exclude_seen: bool = Field(True, description="never recommend an item of the history")
    exclude: list[Id] = Field(default_factory=list, max_length=1000)


class TopNRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    candidates: list[Id] = Field(min_length=2, max_length=1000)
    k: int = Field(10, ge=1, le=1000)
    mode: Literal["beam", "score"] = Field("beam", description="beam search, or exact scoring of every candidate")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
    item_id: Id
    max_tokens: int = Field(32, ge=1, le=128)


class ScoredItem(BaseModel):
    item_id: Id
    score: float = Field(description="log-probability of the item under the model")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model: str
    latency_ms: float


class ExplainResponse(BaseModel):
    explanation: str
    score: float
    model: str
    latency_ms: float
