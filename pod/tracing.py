"""Optional OpenTelemetry spans for the model side (encoder, decoder steps, search), off unless enabled.

The core never needs OpenTelemetry: until a stage calls `enable()` (the server does when `POD_TRACING` is on),
`span()` returns one shared no-op context manager, so a traced line costs a function call and nothing is
imported. Once enabled, spans come from `opentelemetry.trace.get_tracer("pod")` on the provider given (the
global one when none), and nest under whatever span is current in the calling thread.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

_NOOP: AbstractContextManager[None] = nullcontext()
_tracer: Any = None  # an opentelemetry.trace.Tracer while enabled


def enable(provider: Any = None) -> None:
    """Trace from now on, into `provider` (an OpenTelemetry TracerProvider; None: the global provider)."""
    from opentelemetry import trace

    global _tracer
    _tracer = trace.get_tracer("pod", tracer_provider=provider)


def disable() -> None:
    global _tracer
    _tracer = None


def tracer() -> Any:
    """The tracer while tracing is on, else None (callers that need more than `span` test this first)."""
    return _tracer


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span named `name` around a `with` block, a child of the thread's current span; a shared no-op when
    tracing is off. Attribute values must be what OpenTelemetry accepts (str, bool, int, float, lists of one)."""
    t = _tracer
    if t is None:
        return _NOOP
    return t.start_as_current_span(name, attributes=attributes)
