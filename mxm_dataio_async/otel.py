"""OpenTelemetry for mxm-dataio-async (the ``otel`` extra: ``opentelemetry-api`` at run time; an
SDK and exporters are the application's choice).

:class:`OpenTelemetryHook` is a hook (``registry.add_hook(OpenTelemetryHook())``) that turns the
pipeline's events into

- **traces**: a span per fetch (``dataio.fetch <source>``, internal) with a child span per
  upstream attempt following the HTTP client conventions (name: the method; kind: client;
  ``http.request.method``, ``url.full``, ``server.address``, ``server.port``,
  ``http.response.status_code``, ``http.request.resend_count``, ``error.type``); retries are span
  events; cache decisions, outcomes and stale answers are ``dataio.*`` attributes. A fetch span's
  parent is whatever span is current where ``fetch()`` is called.
- **metrics**: ``dataio.requests`` (by ``dataio.source`` and ``dataio.outcome``),
  ``dataio.cache.hits``, ``dataio.retries``, ``dataio.bytes``, ``dataio.breaker.changes``,
  ``http.client.request.duration`` (seconds, per attempt), ``dataio.limiter.wait`` (seconds),
  ``http.client.active_requests`` (attempts in flight).

A Prometheus endpoint (``opentelemetry-exporter-prometheus`` and ``prometheus-client``)::

    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    prometheus_client.start_http_server(9464); registry.add_hook(OpenTelemetryHook(
        meter_provider=MeterProvider(metric_readers=[PrometheusMetricReader()])))
"""

from __future__ import annotations

from mxm_dataio_async._otel import OpenTelemetryHook
from mxm_dataio_async._public import claim as _claim

__all__ = ["OpenTelemetryHook"]


_claim(__name__, __all__, globals())
