"""Schemathesis checks beyond the built-in ones, loaded with `SCHEMATHESIS_HOOKS=reliability.st_checks`.

The issue asks that every 4xx says what was wrong: a client that gets a bare 400 cannot fix its request.
The project's error format is `{"detail": [{"loc": [...], "msg": "...", "input": ...}]}`.
"""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def error_has_message(ctx, response, case) -> bool | None:
    """A 4xx body is JSON whose `detail` is a non-empty list of entries, each with a non-empty `msg`."""
    if not 400 <= response.status_code < 500 or response.status_code == 499:
        return None  # 499: the client left; nobody reads that body
    try:
        body = json.loads(response.text)
    except ValueError:
        raise AssertionError(f"{response.status_code} without a JSON body: {response.text[:200]!r}") from None
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, list) or not detail:
        raise AssertionError(f"{response.status_code} without a `detail` list: {response.text[:200]!r}")
    for entry in detail:
        if not isinstance(entry, dict) or not str(entry.get("msg") or "").strip():
            raise AssertionError(f"{response.status_code} with a detail entry lacking `msg`: {entry!r}")
    return None
