"""The OpenTelemetry hook (public in :mod:`mxm_dataio_async.otel`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

try:
    from opentelemetry import metrics, trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mxm_dataio_async.otel needs the 'otel' extra: pip install 'mxm-dataio-async[otel]'"
    ) from exc

from mxm_dataio_async import __version__
from mxm_dataio_async import _events as ev

__all__ = ["OpenTelemetryHook"]

_SCOPE = "mxm_dataio_async"


class OpenTelemetryHook:
    """Spans and metrics from a registry's (or a session's) events; see the module's docs.

    ```python
    from mxm_dataio_async.otel import OpenTelemetryHook
    registry.add_hook(OpenTelemetryHook())   # the global tracer and meter providers
    ```
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
        self._requests = meter.create_counter(
            "dataio.requests", unit="{request}", description="Fetches, by source and outcome."
        )
        self._hits = meter.create_counter(
            "dataio.cache.hits", unit="{request}", description="Fetches answered by the store."
        )
        self._retries = meter.create_counter(
            "dataio.retries", unit="{attempt}", description="Attempts that failed and were retried."
        )
        self._bytes = meter.create_counter(
            "dataio.bytes", unit="By", description="Payload bytes fetched from the upstream."
        )
        self._breaker = meter.create_counter(
            "dataio.breaker.changes",
            unit="{change}",
            description="Circuit breaker state changes, by source and new state.",
        )
        self._duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of upstream attempts.",
        )
        self._wait = meter.create_histogram(
            "dataio.limiter.wait", unit="s", description="Time an attempt waited for the rate gate."
        )
        self._active = meter.create_up_down_counter(
            "http.client.active_requests",
            unit="{request}",
            description="Upstream attempts in flight.",
        )
        self._fetches: dict[str, tuple[Span, str]] = {}  # request id -> its span, its method
        self._attempts: dict[str, tuple[Span, dict[str, Any]]] = {}  # request id -> attempt

    def __repr__(self) -> str:
        return f"<OpenTelemetryHook fetches={len(self._fetches)} attempts={len(self._attempts)}>"

    def __call__(self, event: ev.Event, /) -> None:
        if isinstance(event, ev.FetchStarted):
            self._fetch_started(event)
        elif isinstance(event, ev.AttemptStarted):
            self._attempt_started(event)
        elif isinstance(event, ev.AttemptFinished):
            self._attempt_finished(event)
        elif isinstance(event, ev.FetchFinished):
            self._fetch_finished(event)
        elif isinstance(event, ev.CacheDecided):
            found = self._fetches.get(event.request_id)
            if found is not None:
                found[0].set_attribute("dataio.cache.decision", event.decision)
        elif isinstance(event, ev.RetryScheduled):
            self._retries.add(1, {"dataio.source": event.source})
            found = self._fetches.get(event.request_id)
            if found is not None:
                found[0].add_event(
                    "retry",
                    {
                        "dataio.attempt": event.attempt,
                        "dataio.wait_s": event.wait,
                        "dataio.reason": event.reason,
                    },
                )
        elif isinstance(event, ev.StaleServed):
            found = self._fetches.get(event.request_id)
            if found is not None:
                found[0].set_attribute("dataio.stale", True)
                found[0].set_attribute("dataio.stale.age_s", event.age_seconds)
        elif isinstance(event, ev.BreakerStateChanged):
            self._breaker.add(1, {"dataio.source": event.source, "dataio.breaker.state": event.new})

    # -- fetches --------------------------------------------------------------------------------

    def _fetch_started(self, event: ev.FetchStarted) -> None:
        span = self._tracer.start_span(
            f"dataio.fetch {event.source}",
            kind=SpanKind.INTERNAL,
            attributes={
                "dataio.source": event.source,
                "dataio.kind": event.kind,
                "dataio.request_hash": event.request_hash,
                "http.request.method": event.method,
            },
        )
        self._fetches[event.request_id] = (span, event.method)

    def _fetch_finished(self, event: ev.FetchFinished) -> None:
        attrs = {"dataio.source": event.source, "dataio.outcome": event.outcome}
        self._requests.add(1, attrs)
        if event.outcome == "cached":
            self._hits.add(1, {"dataio.source": event.source})
        leftover = self._attempts.pop(event.request_id, None)
        if leftover is not None:  # cancelled mid-attempt
            span, metric_attrs = leftover
            self._active.add(-1, metric_attrs)
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            span.end()
        found = self._fetches.pop(event.request_id, None)
        if found is None:
            return
        span = found[0]
        span.set_attribute("dataio.outcome", event.outcome)
        span.set_attribute("dataio.attempts", event.attempts)
        if event.status is not None:
            span.set_attribute("http.response.status_code", event.status)
        if event.outcome in ("failed", "cancelled"):
            span.set_status(Status(StatusCode.ERROR, event.error or event.outcome))
        span.end()

    # -- attempts -------------------------------------------------------------------------------

    def _attempt_started(self, event: ev.AttemptStarted) -> None:
        found = self._fetches.get(event.request_id)
        context = None if found is None else trace.set_span_in_context(found[0])
        method = "HTTP" if found is None else found[1]
        attributes: dict[str, Any] = {"dataio.source": event.source}
        metric_attrs = dict(attributes)
        attributes["http.request.method"] = method
        if event.attempt > 1:
            attributes["http.request.resend_count"] = event.attempt - 1
        span = self._tracer.start_span(
            method, context=context, kind=SpanKind.CLIENT, attributes=attributes
        )
        self._attempts[event.request_id] = (span, metric_attrs)
        self._active.add(1, metric_attrs)
        self._wait.record(event.wait_ms / 1000.0, metric_attrs)

    def _attempt_finished(self, event: ev.AttemptFinished) -> None:
        started = self._attempts.pop(event.request_id, None)
        attrs: dict[str, Any] = {"dataio.source": event.source}
        found = self._fetches.get(event.request_id)
        if found is not None:
            attrs["http.request.method"] = found[1]
        if event.url:
            parts = urlsplit(event.url)
            if parts.hostname:
                attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
        if event.status is not None:
            attrs["http.response.status_code"] = event.status
        failed = event.outcome in ("error", "refused")
        if failed:
            attrs["error.type"] = str(event.status) if event.status else _error_type(event.error)
        self._duration.record(event.elapsed_ms / 1000.0, attrs)
        if event.outcome == "ok":
            self._bytes.add(event.size_bytes, {"dataio.source": event.source})
        if started is None:
            return
        span, metric_attrs = started
        self._active.add(-1, metric_attrs)
        span.set_attributes(attrs)
        if event.url:
            span.set_attribute("url.full", event.url)
        if failed:
            span.set_status(Status(StatusCode.ERROR, event.error or event.outcome))
        span.end()


def _error_type(error: str | None) -> str:
    """The exception's class name from ``"Name: message"`` (``_OTHER`` when unknown)."""
    if not error:
        return "_OTHER"
    return error.split(":", 1)[0] or "_OTHER"
