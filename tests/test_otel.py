"""OpenTelemetry: spans and metrics of real fetches (loopback server), through the SDK's
in-memory exporters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import mxm_dataio_async as dio
from mxm_dataio_async.otel import OpenTelemetryHook
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving
from tests._upstream import Upstream

pytestmark = pytest.mark.anyio


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "mxm_dataio_async"
            for metric in scope.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


async def test_a_span_per_fetch_with_a_child_per_attempt_and_metrics(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    hook = OpenTelemetryHook(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    upstream = Upstream(503, 200)
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=FakeClock(), hooks=[hook]) as registry:
            registry.register(
                "up",
                dio.HttpAdapter(base_url=url),
                retry=dio.RetryPolicy(max_attempts=2, base_delay=0.5, jitter=0),
            )
            async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                await s.fetch(s.request("q", endpoint="/q", params={"api_key": "s3cr3t"}))
                await s.fetch(s.request("q", endpoint="/q", params={"api_key": "s3cr3t"}))
    finished: tuple[ReadableSpan, ...] = spans.get_finished_spans()
    fetches = [sp for sp in finished if sp.name == "dataio.fetch up"]
    attempts = [sp for sp in finished if sp.kind is SpanKind.CLIENT]
    assert len(fetches) == 2 and len(attempts) == 2
    miss, hit = fetches
    assert miss.attributes is not None and hit.attributes is not None
    assert miss.attributes["dataio.outcome"] == "fetched"
    assert miss.attributes["dataio.cache.decision"] == "fetch"
    assert hit.attributes["dataio.outcome"] == "cached"
    assert [e.name for e in miss.events] == ["retry"]
    first, second = attempts
    for attempt in attempts:
        assert attempt.name == "GET" and attempt.parent is not None
        assert attempt.parent.span_id == miss.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes["http.request.method"] == "GET"
        assert attempt.attributes["server.address"] == "127.0.0.1"
        assert "s3cr3t" not in str(attempt.attributes["url.full"])  # redacted, never exported
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503" and first.status.status_code is StatusCode.ERROR
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1
    assert "error.type" not in second.attributes

    points = metric_points(reader)
    by_outcome = {p.attributes["dataio.outcome"]: p.value for p in points["dataio.requests"]}
    assert by_outcome == {"fetched": 1, "cached": 1}
    assert [p.value for p in points["dataio.cache.hits"]] == [1]
    assert [p.value for p in points["dataio.retries"]] == [1]
    assert [p.value for p in points["dataio.bytes"]] == [len(b'{"n": 2}')]
    durations = {
        p.attributes["http.response.status_code"]: p.count
        for p in points["http.client.request.duration"]
    }
    assert durations == {503: 1, 200: 1}
    assert sum(p.count for p in points["dataio.limiter.wait"]) == 2
    assert [p.value for p in points["http.client.active_requests"]] == [0]


async def test_a_failed_fetch_is_an_error_span(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    hook = OpenTelemetryHook(tracer_provider=tracer_provider, meter_provider=MeterProvider())
    async with serving(Upstream(404).app()) as url:
        async with dio.Registry(hooks=[hook]) as registry:
            registry.register("up", dio.HttpAdapter(base_url=url))
            async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                with pytest.raises(dio.FetchError):
                    await s.fetch(s.request("q", endpoint="/q"))
    fetch = next(sp for sp in spans.get_finished_spans() if sp.name == "dataio.fetch up")
    assert fetch.status.status_code is StatusCode.ERROR
    assert fetch.attributes is not None and fetch.attributes["dataio.outcome"] == "failed"
    assert repr(hook) == "<OpenTelemetryHook fetches=0 attempts=0>"  # nothing left behind


async def test_the_readmes_prometheus_example(tmp_path: Path) -> None:
    """The README's three lines, then a scrape of the endpoint they start."""
    import urllib.request

    import anyio
    import prometheus_client
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    server, thread = prometheus_client.start_http_server(0, addr="127.0.0.1")
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    try:
        async with serving(Upstream(200).app()) as url:
            async with dio.Registry() as registry:
                registry.register("up", dio.HttpAdapter(base_url=url))
                registry.add_hook(OpenTelemetryHook(meter_provider=meter_provider))
                async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                    await s.fetch(s.request("q", endpoint="/q"))
        endpoint = f"http://127.0.0.1:{server.server_port}/metrics"
        text = await anyio.to_thread.run_sync(
            lambda: urllib.request.urlopen(endpoint, timeout=10).read().decode()
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        meter_provider.shutdown()  # unregisters its collector from prometheus_client
    assert 'dataio_requests_total{dataio_outcome="fetched",dataio_source="up"' in text
    assert "http_client_request_duration_seconds_bucket" in text
