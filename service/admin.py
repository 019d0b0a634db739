"""Day-two operations behind the bearer token: swap the model without a restart, and mark items unavailable.

Both change `app.state.model` (a `service.models.Served`) by replacing it, never by mutating it, so requests in
flight keep the model they started with. Without `POD_API_TOKEN` the admin endpoints answer 403: an open
server must not let anyone replace its model.

- `POST /admin/model`: load a bundle (or checkpoint) beside the serving one, in a thread of its own so serving
  goes on; its hashes are verified by `Bundle.load` and it must pass `service.models.smoke_test`; only then is
  it swapped in. A bad one is refused (422 naming what is wrong) and the old model keeps serving.
- `GET`/`POST /admin/availability`: out-of-stock or delisted items (raw IDs or internal indices) stop being
  recommended at once, in every mode, and can be re-enabled; with `POD_AVAILABILITY_FILE` the list survives
  restarts (written atomically, read at start-up).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Security

from pod import tracing
from pod.atomic import write_text_atomically
from service.dependencies import authorized
from service.loading import load_recommender
from service.models import Served, smoke_test
from service.routes import ERRORS, UNAUTHORIZED, bad, items_of
from service.schemas import AvailabilityRequest, AvailabilityResponse, ModelSwapRequest, ModelSwapResponse

log = logging.getLogger("pod.service")


async def admin_allowed(request: Request) -> None:
    if request.app.state.api_token is None:
        raise HTTPException(
            403,
            detail=[{"loc": [], "msg": "admin endpoints are off: start the server with POD_API_TOKEN", "input": None}],
        )


admin = APIRouter(
    prefix="/admin",
    dependencies=[Security(admin_allowed), Security(authorized)],
    responses={**ERRORS, **UNAUTHORIZED, 403: {"description": "the server has no POD_API_TOKEN"}},
)


def load_availability(path: str | None) -> frozenset[str]:
    """Raw item IDs marked unavailable in `path` (a JSON list), or none; a broken file stops the start-up with
    its name rather than serving items someone marked unavailable."""
    if not path or not Path(path).is_file():
        return frozenset()
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON list of item IDs ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: not a JSON list of item ID strings")
    return frozenset(value)


@admin.get("/availability", response_model=AvailabilityResponse)
async def availability(request: Request) -> AvailabilityResponse:
    state = request.app.state
    return AvailabilityResponse(unavailable=sorted(state.unavailable_raw), model=state.model.label)


@admin.post("/availability", response_model=AvailabilityResponse)
async def set_availability(body: AvailabilityRequest, request: Request) -> AvailabilityResponse:
    state = request.app.state
    catalog = state.model.recommender.catalog
    raw = {
        name: {catalog.id2item[i] for i in items_of(catalog, name, getattr(body, name))}
        for name in ("unavailable", "available")
    }
    if both := raw["unavailable"] & raw["available"]:
        raise bad("available", f"items both unavailable and available: {sorted(both)[:20]}", sorted(both)[:20])
    marked = (state.unavailable_raw | raw["unavailable"]) - raw["available"]
    if path := state.settings.availability_file:
        write_text_atomically(Path(path), json.dumps(sorted(marked)))
    state.unavailable_raw = frozenset(marked)
    state.model = state.model.with_unavailable(marked)
    state.metrics.unavailable.set(len(state.model.unavailable))
    log.info("availability", extra={"fields": {"unavailable": len(marked)}})
    return AvailabilityResponse(unavailable=sorted(marked), model=state.model.label)


@admin.post("/model", response_model=ModelSwapResponse)
async def swap_model(body: ModelSwapRequest, request: Request) -> ModelSwapResponse:
    state = request.app.state
    settings = state.settings
    field = "checkpoint" if settings.runtime == "torch" else "bundle"
    path = getattr(body, field)
    if not path:
        raise bad(field, f"the {settings.runtime} runtime swaps to a new {field}; send its directory", None)
    if state.swapping.locked():
        raise HTTPException(409, detail=[{"loc": [], "msg": "a model swap is already under way", "input": None}])
    async with state.swapping:
        t0 = time.perf_counter()
        candidate = settings.model_copy(update={field: path})

        def load_and_test() -> tuple:
            with tracing.span("model.load", runtime=settings.runtime):
                recommender, label = load_recommender(candidate)  # verifies the bundle's hashes
            with tracing.span("model.smoke_test"):
                smoke_test(recommender)
            return recommender, label

        try:  # a thread of its own (its spans under the request's): the model thread keeps serving meanwhile
            in_request = contextvars.copy_context()
            recommender, label = await asyncio.get_running_loop().run_in_executor(None, in_request.run, load_and_test)
        except Exception as exc:
            log.warning("model swap refused", extra={"fields": {field: path, "error": str(exc)}})
            raise bad(field, f"refused, the current model keeps serving: {exc}", path) from None
        old = state.model
        state.model = Served(recommender, label, old.generation + 1).with_unavailable(state.unavailable_raw)
        setattr(settings, field, path)  # the next swap's settings start from the model now serving
        state.metrics.model_info.labels(old.label).set(0)
        state.metrics.model_info.labels(label).set(1)
        seconds = time.perf_counter() - t0
        log.info("model swapped", extra={"fields": {"model": label, "previous": old.label, "seconds": seconds}})
        return ModelSwapResponse(model=label, previous=old.label, seconds=round(seconds, 3))
