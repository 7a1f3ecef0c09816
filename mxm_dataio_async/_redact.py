"""Secret redaction: what must never reach the store.

Headers and query parameters that carry credentials are replaced by ``REDACTED`` before any row is
written, and credentials embedded in URLs (``https://user:pass@host``) are stripped. The defaults
cover the usual names; adapters and users add their own through :class:`Redaction`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

V = TypeVar("V")

__all__ = [
    "DEFAULT_REDACTED_HEADERS",
    "DEFAULT_REDACTED_PARAMS",
    "REDACTED",
    "Redaction",
]

REDACTED = "[REDACTED]"

DEFAULT_REDACTED_HEADERS: frozenset[str] = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
DEFAULT_REDACTED_PARAMS: frozenset[str] = frozenset(
    {"api_key", "apikey", "token", "access_token", "key", "signature"}
)


def _lower(names: Iterable[str]) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


@dataclass(frozen=True, slots=True)
class Redaction:
    """Which header and query-parameter names are secrets (matched case-insensitively).

    ``Redaction.extend(headers={"x-my-token"})`` adds to the defaults; ``replace=True`` uses only
    the names given.
    """

    headers: frozenset[str] = field(default=DEFAULT_REDACTED_HEADERS)
    params: frozenset[str] = field(default=DEFAULT_REDACTED_PARAMS)

    @classmethod
    def extend(
        cls,
        headers: Iterable[str] = (),
        params: Iterable[str] = (),
        *,
        replace: bool = False,
    ) -> Redaction:
        h = _lower(headers)
        p = _lower(params)
        if not replace:
            h |= DEFAULT_REDACTED_HEADERS
            p |= DEFAULT_REDACTED_PARAMS
        return cls(headers=h, params=p)

    def merge(self, other: Redaction) -> Redaction:
        return Redaction(headers=self.headers | other.headers, params=self.params | other.params)

    def is_secret_header(self, name: str) -> bool:
        return name.lower() in self.headers

    def is_secret_param(self, name: str) -> bool:
        return name.lower() in self.params

    def params_of(self, params: Mapping[str, V]) -> dict[str, V | str]:
        """A copy of ``params`` with secret values replaced."""
        secret = self.params
        out: dict[str, V | str] = {}
        for k, v in params.items():  # a loop: a comprehension would need a closure per call
            out[k] = REDACTED if k.lower() in secret else v
        return out

    def without_secret_params(self, params: Mapping[str, V]) -> dict[str, V]:
        """A copy of ``params`` without the secret ones (a request's identity leaves them out)."""
        secret = self.params
        out: dict[str, V] = {}
        for k, v in params.items():
            if k.lower() not in secret:
                out[k] = v
        return out

    def has_secret_param(self, names: Iterable[str]) -> bool:
        """Whether any of ``names`` is a secret parameter."""
        secret = self.params
        for name in names:  # noqa: SIM110 - a loop: no generator (nor closure) per request
            if name.lower() in secret:
                return True
        return False

    def headers_of(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        """A copy of ``headers`` with secret values replaced."""
        if headers is None:
            return None
        secret = self.headers
        out: dict[str, str] = {}
        for k, v in headers.items():  # a loop: a comprehension would need a closure per call
            out[k] = REDACTED if k.lower() in secret else v
        return out

    def url(self, url: str | None) -> str | None:
        """``url`` without userinfo and with secret query parameters replaced."""
        if not url or ("@" not in url and "?" not in url):
            return url  # no userinfo and no query: nothing can be secret (the common case)
        return self._url(url)

    def _url(self, url: str) -> str:
        # Apart from url(): its comprehension's closure is made only when there is a query.
        try:
            parts = urlsplit(url)
        except ValueError:
            return REDACTED
        netloc = parts.netloc
        if "@" in netloc:
            netloc = netloc.rsplit("@", 1)[1]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if self.has_secret_param(k for k, _ in pairs):
                secret = self.params
                kept = [(k, REDACTED if k.lower() in secret else v) for k, v in pairs]
                query = urlencode(kept, quote_via=quote, safe="[]")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
