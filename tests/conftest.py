from __future__ import annotations

import os

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def service_url(variable: str, what: str) -> str:
    """The URL of a test service (started by ``.ci/services.sh`` or ``scripts/services``).

    Without it the test is skipped, except where ``MXM_DATAIO_REQUIRE_SERVICES`` is set (CI):
    there a missing service is a failure, not a silent skip.
    """
    url = os.environ.get(variable)
    if url:
        return url
    message = f"{what} not configured: {variable} is unset (start scripts/services)"
    if os.environ.get("MXM_DATAIO_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> str:
    """A PostgreSQL server's URL (database ``postgres``; create schemas or databases in it)."""
    return service_url("MXM_DATAIO_TEST_POSTGRES_URL", "PostgreSQL")


@pytest.fixture
def s3_url() -> str:
    """``s3://bucket/prefix`` on an S3 server; endpoint and credentials in the AWS_* variables."""
    return service_url("MXM_DATAIO_TEST_S3_URL", "S3")


@pytest.fixture
def redis_url() -> str:
    """A Redis server's URL (``redis://127.0.0.1:P/0``; give each test its own key prefix)."""
    return service_url("MXM_DATAIO_TEST_REDIS_URL", "Redis")
