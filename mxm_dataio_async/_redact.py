"""Secret redaction: what must never reach the store.

Headers and query parameters that carry credentials are replaced by ``REDACTED`` before any row is
written, and credentials embedded in URLs (``https://user:pass@host``) are stripped. The defaults
cover the usual names; adapters and users add their own through :class:`Redaction`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

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

    def headers_of(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        """A copy of ``headers`` with secret values replaced."""
        if headers is None:
            return None
        return {k: (REDACTED if k.lower() in self.headers else v) for k, v in headers.items()}

    def url(self, url: str | None) -> str | None:
        """``url`` without userinfo and with secret query parameters replaced."""
        if not url or ("@" not in url and "?" not in url):
            return url  # no userinfo and no query: nothing can be secret (the common case)
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
            if any(k.lower() in self.params for k, _ in pairs):
                query = urlencode(
                    [(k, REDACTED if k.lower() in self.params else v) for k, v in pairs],
                    quote_via=quote,
                    safe="[]",
                )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
