from __future__ import annotations

import ast
import inspect
from pathlib import Path

import mxm_dataio_async as dio


def test_all_is_sorted_and_unique() -> None:
    assert list(dio.__all__) == sorted(set(dio.__all__))


def test_all_is_complete() -> None:
    """Every public name the package imports is exported, and every export exists."""
    tree = ast.parse(Path(dio.__file__).read_text())
    imported = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    public = {name for name in imported if not name.startswith("_")}
    assert public == set(dio.__all__)
    for name in dio.__all__:
        assert hasattr(dio, name), name


def test_exported_classes_claim_public_module() -> None:
    # Every public name is reachable from the package root, and the contract's names are there.
    contract = {
        "AsyncSession",
        "Store",
        "Registry",
        "HttpAdapter",
        "RateLimit",
        "RetryPolicy",
        "Session",
        "Request",
        "Response",
        "ResponseStatus",
        "CacheMode",
        "AdapterResult",
        "Fetcher",
        "Sender",
        "Streamer",
        "DataIOError",
        "AdapterNotFound",
        "CapabilityError",
        "CacheMiss",
        "TransientError",
        "FetchError",
        "IntegrityError",
        "StoreError",
        "register",
        "unregister",
        "resolve_adapter",
        "list_registered",
    }
    assert contract <= set(dio.__all__)


def test_exception_tree() -> None:
    for name in (
        "AdapterNotFound",
        "CapabilityError",
        "CacheMiss",
        "TransientError",
        "FetchError",
        "IntegrityError",
        "StoreError",
        "StoreClosedError",
    ):
        assert issubclass(getattr(dio, name), dio.DataIOError), name
    assert issubclass(dio.AdapterNotFound, KeyError)
    assert issubclass(dio.CapabilityError, TypeError)
    assert issubclass(dio.CacheMiss, LookupError)
    doc = inspect.getdoc(__import__("mxm_dataio_async._exceptions", fromlist=["x"]))
    assert doc is not None and "DataIOError" in doc and "StoreError" in doc
