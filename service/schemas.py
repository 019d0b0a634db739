"""Request and response bodies (OpenAPI at /docs). IDs are JSON integers (internal indices) or JSON
strings (raw IDs as in the data, e.g. ASINs); a response uses the form the request used.

Requests are validated strictly: a value of the wrong JSON type is a 422, never silently converted, so
`"k": "5"`, `"k": 5.0` and `"k": true` are refused, as is `1` for a boolean. A client's mistake then shows
up where it was made instead of as a plausible answer to another question.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

# Every list and string a request carries is bounded in the schema (and so in OpenAPI), besides the body-size
# limit: validation cost and the size of an error echo stay small whatever a client sends.
MAX_LIST = 1000
MAX_ID_CHARS = 256
Id = StrictInt | Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)]
STRICT = ConfigDict(extra="forbid", strict=True)


def _finite(value: Any) -> Any:
    """Python's JSON reader accepts NaN and Infinity; say that is what is wrong, not just "not an integer"."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    return value


Count = Annotated[int, BeforeValidator(_finite)]


class SequentialRequest(BaseModel):
    model_config = STRICT
    user_id: Id
    history: list[Id] | None = Field(
        None, max_length=MAX_LIST, description="items in time order; default: the known history"
    )
    k: Count = Field(10, ge=1, le=20)
    exclude_seen: bool = Field(True, description="never recommend an item of the history")
    exclude: list[Id] = Field(default_factory=list, max_length=MAX_LIST)


class TopNRequest(BaseModel):
    model_config = STRICT
    user_id: Id
    candidates: list[Id] = Field(min_length=2, max_length=MAX_LIST)
    k: Count = Field(10, ge=1, le=MAX_LIST)
    mode: Literal["beam", "score"] = Field("beam", description="beam search, or exact scoring of every candidate")
    history: list[Id] | None = Field(
        None,
        max_length=MAX_LIST,
        description="items in time order, read by models trained with top-N history; default: the known history",
    )


class ExplainRequest(BaseModel):
    model_config = STRICT
    user_id: Id
    item_id: Id
    max_tokens: Count = Field(32, ge=1, le=128)


class ScoredItem(BaseModel):
    item_id: Id
    score: float = Field(
        description="log-probability of the item under the model (with the `allowed` normalizer: given that the "
        "model writes a valid ID)"
    )


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model: str
    latency_ms: float


class ExplainResponse(BaseModel):
    explanation: str
    score: float
    model: str
    latency_ms: float


class ErrorEntry(BaseModel):
    loc: list[str | int] = Field(description="where the problem is, e.g. ['body', 'history']; [] for the request")
    msg: str = Field(description="what is wrong, in words")
    input: Any = Field(None, description="the offending value, when there is one")


class ErrorResponse(BaseModel):
    """Every error the service answers (4xx and 5xx) has this shape, so a client can always show `msg`."""

    detail: list[ErrorEntry]


class AvailabilityRequest(BaseModel):
    model_config = STRICT
    unavailable: list[Id] = Field(default_factory=list, max_length=100_000, description="items to stop recommending")
    available: list[Id] = Field(default_factory=list, max_length=100_000, description="items to recommend again")


class AvailabilityResponse(BaseModel):
    unavailable: list[str] = Field(description="raw IDs of every item marked unavailable, sorted")
    model: str


class ModelSwapRequest(BaseModel):
    model_config = STRICT
    bundle: str | None = Field(None, max_length=4096, description="bundle directory (ONNX runtime)")
    checkpoint: str | None = Field(None, max_length=4096, description="checkpoint directory (PyTorch runtime)")


class ModelSwapResponse(BaseModel):
    model: str = Field(description="the label of the model now serving")
    previous: str
    seconds: float = Field(description="load, verification and smoke test")
