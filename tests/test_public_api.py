from __future__ import annotations

import ast
import importlib.metadata
import inspect
import pickle
import typing
from pathlib import Path
from types import FunctionType, ModuleType

import pytest

import mxm_dataio_async as dio
import mxm_dataio_async.adapters as dio_adapters
import mxm_dataio_async.datasets as dio_datasets
import mxm_dataio_async.otel as dio_otel
import mxm_dataio_async.redis as dio_redis
import mxm_dataio_async.store as dio_store
import mxm_dataio_async.telemetry as dio_telemetry
import mxm_dataio_async.testing as dio_testing


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
        "CoordinationError",
    ):
        assert issubclass(getattr(dio, name), dio.DataIOError), name
    assert issubclass(dio.AdapterNotFound, KeyError)
    assert issubclass(dio.CapabilityError, TypeError)
    assert issubclass(dio.CacheMiss, LookupError)
    doc = inspect.getdoc(__import__("mxm_dataio_async._exceptions", fromlist=["x"]))
    assert doc is not None and "DataIOError" in doc and "StoreError" in doc


# -- the public surface: root, redis, store, testing -----------------------------------------------

PUBLIC_MODULES = (dio, dio_datasets, dio_otel, dio_redis, dio_store, dio_telemetry, dio_testing)

# Exported from the root until 0.1.0; served there for one release with a DeprecationWarning.
MOVED_TO_STORE = (
    "ExportReport",
    "GcReport",
    "ImportReport",
    "Lease",
    "LimiterStatistics",
    "Problem",
    "PruneReport",
    "SourceLimiter",
    "StoreStats",
    "VerifyReport",
)


def _reexported(module: ModuleType) -> set[str]:
    """The public names a module imports from the package at its top level."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    return {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mxm_dataio_async")
        for alias in node.names
        if not (alias.asname or alias.name).startswith("_")
    }


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_module_all_is_sorted_complete_and_resolvable(module: ModuleType) -> None:
    assert list(module.__all__) == sorted(set(module.__all__))
    assert _reexported(module) == set(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), name


def test_root_surface_stays_small() -> None:
    assert len(dio.__all__) == 44
    assert len(dio.__all__) <= 45


def _claimed(module: ModuleType) -> list[tuple[str, object]]:
    return [
        (name, obj)
        for name in module.__all__
        if isinstance(obj := getattr(module, name), type | FunctionType)
    ]


@pytest.mark.parametrize("module", [*PUBLIC_MODULES, dio_adapters], ids=lambda m: m.__name__)
def test_exported_names_claim_their_public_module(module: ModuleType) -> None:
    """Reprs, docs and pickles show the public path: the root for what it exports, else the
    module that exports it (``adapters`` re-exports its public submodules' classes)."""
    for name, obj in _claimed(module):
        home = getattr(obj, "__module__", None)
        if name in dio.__all__:
            assert home == "mxm_dataio_async", name
        elif module is dio_adapters:
            assert isinstance(home, str), name
            assert home.startswith("mxm_dataio_async.adapters"), (name, home)
            assert "._" not in home, (name, home)
        else:
            assert home == module.__name__, name


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_exported_classes_and_functions_pickle_by_public_path(module: ModuleType) -> None:
    for name, obj in _claimed(module):
        assert pickle.loads(pickle.dumps(obj)) is obj, name


def test_exported_values_still_pickle() -> None:
    for value in (
        dio.RateLimit(10, per=1.0, burst=2),
        dio.CacheMode.ONLY_IF_CACHED,
        dio_store.ProblemKind.MISSING_PAYLOAD,
    ):
        assert pickle.loads(pickle.dumps(value)) == value
    assert repr(dio.CacheMode.ONLY_IF_CACHED).startswith("<CacheMode.")


@pytest.mark.parametrize("name", MOVED_TO_STORE)
def test_moved_name_warns_and_is_the_store_object(name: str) -> None:
    assert name not in dio.__all__
    assert name not in vars(dio)  # resolved through __getattr__, not imported eagerly
    assert name in dio_store.__all__
    with pytest.warns(DeprecationWarning, match=r"mxm_dataio_async\.store") as record:
        obj = getattr(dio, name)
    assert obj is getattr(dio_store, name)
    assert f"mxm_dataio_async.{name} is deprecated" in str(record[0].message)
    assert record[0].filename == __file__  # stacklevel points at the caller


def test_moved_name_warns_on_from_import() -> None:
    with pytest.warns(DeprecationWarning, match=r"mxm_dataio_async\.store"):
        from mxm_dataio_async import VerifyReport
    assert VerifyReport is dio_store.VerifyReport


def test_unknown_root_attribute_raises_attribute_error() -> None:
    name = "NoSuchName"
    with pytest.raises(AttributeError, match="NoSuchName"):
        getattr(dio, name)
    assert not hasattr(dio, name)


def test_version_comes_from_package_metadata() -> None:
    assert dio.__version__ == importlib.metadata.version("mxm-dataio-async")


def test_testing_clock_is_the_root_clock() -> None:
    assert dio_testing.Clock is dio.Clock
    assert isinstance(dio_testing.FakeClock(), dio.Clock)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_type_hints_of_exported_classes_resolve(module: ModuleType) -> None:
    """Renaming a class's home must not break ``typing.get_type_hints`` (pydantic, typer and
    cattrs read them): the annotations were resolved where the class is defined."""
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type):
            hints = typing.get_type_hints(obj)
            assert all(not isinstance(v, str) for v in hints.values()), (name, hints)
