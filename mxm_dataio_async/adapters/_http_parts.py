"""The parts of HttpAdapter that are not the exchange itself: request building (query strings,
header layers) and its options (redaction, timeouts, TLS, proxy, response header limits)."""

from __future__ import annotations

import inspect
import os
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn, TypeAlias

import aiohttp

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._identity import JSONValue
from mxm_dataio_async._redact import Redaction

__all__ = [
    "ClientCert",
    "SSLOption",
    "check_proxy",
    "header",
    "header_limits",
    "make_redaction",
    "make_ssl",
    "make_timeout",
    "merge_headers",
    "names_in",
    "query",
    "min_total",
]

PathLike: TypeAlias = str | os.PathLike[str]
SSLOption: TypeAlias = ssl.SSLContext | bool | PathLike | None
ClientCert: TypeAlias = PathLike | tuple[PathLike, PathLike] | None


def _query_value(key: str, value: JSONValue) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise FetchError(
        f"query parameter {key!r} holds a {type(value).__name__}; a query string carries only "
        "scalars and lists of scalars (send structured data as the JSON body)"
    )


def query(params: Mapping[str, JSONValue]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, list):
            pairs.extend((key, _query_value(key, item)) for item in value if item is not None)
        else:
            pairs.append((key, _query_value(key, value)))
    return pairs


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive lookup in a plain mapping (stored response headers)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def merge_headers(*layers: Mapping[str, str] | None) -> dict[str, str]:
    """Later layers override earlier ones, matching names case-insensitively."""
    out: dict[str, str] = {}
    lower: dict[str, str] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            previous = lower.get(key.lower())
            if previous is not None:
                del out[previous]
            lower[key.lower()] = key
            out[key] = value
    return out


def make_redaction(
    redact: Redaction | Iterable[str] | None, redact_params: Iterable[str]
) -> Redaction:
    params = [redact_params] if isinstance(redact_params, str) else list(redact_params)
    if redact is None:
        return Redaction.extend(params=params) if params else Redaction()
    if isinstance(redact, Redaction):
        return redact.merge(
            Redaction(headers=frozenset(), params=frozenset(p.lower() for p in params))
        )
    names = [redact] if isinstance(redact, str) else list(redact)
    return Redaction.extend(headers=names, params=params)


def make_timeout(timeout: float | aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    if isinstance(timeout, aiohttp.ClientTimeout):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds or a ClientTimeout, not {timeout!r}"
        )
    # Per network wait, like httpx: no total, so a large body takes as long as it needs while a
    # stalled connection still fails.
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)


def _no_password() -> NoReturn:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ValueError("the client key is encrypted: load it into an SSLContext of your own")


def make_ssl(option: SSLOption, client_cert: ClientCert) -> ssl.SSLContext | bool:
    """What aiohttp's connector gets as ``ssl``.

    ``None`` / ``True``: verify against the default CAs (aiohttp's default context); ``False``: no
    verification; a path: verify against that CA bundle (a PEM file, or a directory of hashed
    certificates); an ``SSLContext``: used as is. ``client_cert``: a PEM file holding certificate
    and key, or a ``(certificate, key)`` pair of files, presented to servers that ask for one.
    """
    if isinstance(option, ssl.SSLContext):
        if client_cert is not None:
            raise ValueError(
                "client_cert cannot be combined with an SSLContext: load the certificate into the "
                "context (context.load_cert_chain(certfile, keyfile))"
            )
        return option
    if option is None:
        option = True
    if isinstance(option, bool):
        if client_cert is None:
            return option
        context = ssl.create_default_context()
        if not option:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    elif isinstance(option, str | os.PathLike):
        path = os.fspath(option)
        try:
            if os.path.isdir(path):
                context = ssl.create_default_context(capath=path)
            else:
                context = ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"ssl: cannot load the CA bundle {path!r}: {exc}") from exc
    else:
        raise TypeError(
            "ssl must be an SSLContext, True, False, or the path of a CA bundle, "
            f"not {type(option).__name__}"
        )
    if client_cert is not None:
        if isinstance(client_cert, tuple):
            cert, key = client_cert
            certfile, keyfile = os.fspath(cert), os.fspath(key)
        else:
            certfile, keyfile = os.fspath(client_cert), None
        try:
            context.load_cert_chain(certfile, keyfile, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"client_cert: cannot load {certfile!r}: {exc}") from exc
    return context


def check_proxy(proxy: str | None) -> str | None:
    if proxy is not None and not (
        isinstance(proxy, str) and proxy.startswith(("http://", "https://"))
    ):
        raise ValueError(f"proxy must be an http:// or https:// URL, not {proxy!r}")
    return proxy


_SESSION_PARAMETERS: Final = inspect.signature(aiohttp.ClientSession).parameters


def header_limits(**limits: int) -> dict[str, Any]:
    """aiohttp's response-head limits (``max_line_size``, ``max_field_size``, ``max_headers``), as
    ``ClientSession`` keywords; one this aiohttp lacks may only be left at aiohttp's default."""
    out: dict[str, Any] = {}
    for name, value in limits.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        parameter = _SESSION_PARAMETERS.get(name)
        if parameter is not None:
            out[name] = value
        elif value != {"max_headers": 128}.get(name, 8190):
            raise ValueError(f"{name} needs a newer aiohttp than {aiohttp.__version__}")
    return out


def min_total(a: float | None, b: float | None) -> float | None:
    """The smaller of two limits, ``None`` meaning none."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def names_in(names: frozenset[str], text: str) -> bool:
    """Whether any of ``names`` occurs in ``text`` (a loop: no generator, nor its closure, per
    response)."""
    for name in names:  # noqa: SIM110
        if name in text:
            return True
    return False
