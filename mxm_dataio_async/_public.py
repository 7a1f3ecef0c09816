"""Public modules name themselves as the home of what they export.

``obj.__module__`` is set to the public module (``mxm_dataio_async``, ``mxm_dataio_async.store``,
...), so reprs, documentation and pickles show the path users import from, not the private module
that defines the object. Before a class is renamed, its own annotations are resolved in the module
that defines it: ``typing.get_type_hints`` looks names up in ``sys.modules[cls.__module__]``, and
the public module does not hold the names (``Mapping``, ``datetime``, ...) those strings mention.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["claim"]


def claim(
    module: str, names: Iterable[str], namespace: Mapping[str, Any], *, root: bool = False
) -> None:
    """Make ``module`` the home of the classes and functions among ``names``: all of them for
    the package ``root``; for a submodule, those still homed in a private module (a name the
    root exports keeps the root)."""
    for name in names:
        obj = namespace[name]
        if not isinstance(obj, type | types.FunctionType):
            continue
        if not root and "._" not in obj.__module__:
            continue
        if isinstance(obj, type):
            _resolve_annotations(obj)
        obj.__module__ = module


def _resolve_annotations(cls: type) -> None:
    own = inspect.get_annotations(cls)  # this class's own, not its bases'
    if not own:
        return
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # a name only a type checker sees: leave them as text
        return
    cls.__annotations__ = {key: hints.get(key, value) for key, value in own.items()}
