"""Fixtures for tests across simulated hosts (``_netns.Network``): skipped, with the reason, where
network namespaces cannot be created (not root, no ``ip``, no CAP_SYS_ADMIN). A missing service
program (redis-server, PostgreSQL) skips too, or fails where ``MXM_DATAIO_REQUIRE_SERVICES`` is
set (CI), as the other service fixtures do."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack

import pytest

from ._netns import (
    NamespacesUnavailable,
    Network,
    PostgresTemplate,
    Service,
    ServiceUnavailable,
    Upstream,
)

MakeNetwork = Callable[..., Network]


def skip_without_namespaces(reason: str) -> None:
    pytest.skip(f"network namespaces unavailable: {reason}")


def service_missing(reason: str) -> None:
    if os.environ.get("MXM_DATAIO_REQUIRE_SERVICES"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[PostgresTemplate]:
    """One ``initdb`` per session (lazily, on the first PostgreSQL), copied for each server."""
    with PostgresTemplate() as template:
        yield template


@pytest.fixture
def make_network(postgres_template: PostgresTemplate) -> Iterator[MakeNetwork]:
    """``make_network(hosts=2)``: an open :class:`Network` (hosts a count or names), closed at
    teardown; the test is skipped if namespaces cannot be created here."""
    with ExitStack() as stack:

        def make(hosts: int | Sequence[str] = 2) -> Network:
            try:
                return stack.enter_context(Network(hosts, postgres_template=postgres_template))
            except NamespacesUnavailable as e:
                skip_without_namespaces(str(e))
                raise  # unreachable: skip raises

        yield make


@pytest.fixture
def network(make_network: MakeNetwork) -> Network:
    """Two hosts, ``a`` and ``b``, and the services namespace."""
    return make_network(("a", "b"))


def _start(start: Callable[[], Service]) -> Service:
    try:
        return start()
    except ServiceUnavailable as e:
        service_missing(str(e))
        raise  # unreachable


@pytest.fixture
def net_redis(network: Network) -> Service:
    """Redis in ``network``'s services namespace; ``.url`` is ``redis://10.213.X.1:P/0``."""
    return _start(network.start_redis)


@pytest.fixture
def net_postgres(network: Network) -> Service:
    """PostgreSQL in ``network``'s services namespace; ``.url`` is
    ``postgresql://dataio:dataio@10.213.X.1:P/postgres``."""
    return _start(network.start_postgres)


@pytest.fixture
def net_upstream(network: Network) -> Upstream:
    """The counting HTTP upstream in ``network``'s services namespace; ``.hits()``."""
    return network.start_upstream()
