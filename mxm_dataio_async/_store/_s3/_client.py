"""obstore, imported in one place (the ``s3`` extra is optional), the URL and options of an
``S3Payloads``, and the translation of obstore's errors into ``StoreError``."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl, urlsplit

from mxm_dataio_async._exceptions import StoreError

if TYPE_CHECKING:
    import obstore as obs
    from obstore.exceptions import (
        AlreadyExistsError,
        BaseError,
        NotSupportedError,
        PermissionDeniedError,
        PreconditionError,
        UnauthenticatedError,
        UnknownConfigurationKeyError,
    )
    from obstore.store import S3Store

    OBSTORE_MISSING: ImportError | None = None
else:
    try:
        import obstore as obs
        from obstore.exceptions import (
            AlreadyExistsError,
            BaseError,
            NotSupportedError,
            PermissionDeniedError,
            PreconditionError,
            UnauthenticatedError,
            UnknownConfigurationKeyError,
        )
        from obstore.store import S3Store

        OBSTORE_MISSING = None
    except ImportError as exc:  # the s3 extra is not installed
        OBSTORE_MISSING = exc


HEX64: Final = re.compile(r"[0-9a-f]{64}")  # a content address
_RETRY_TIMEOUT: Final = 30.0  # seconds obstore retries a request (its default is 180)

# Client settings (obstore's ClientConfig) and retry settings; other keys are S3 settings.
__all__ = [  # obstore's names too: _payloads reaches them as client.<name>
    "HEX64",
    "OBSTORE_MISSING",
    "AlreadyExistsError",
    "BaseError",
    "NotSupportedError",
    "PermissionDeniedError",
    "PreconditionError",
    "S3Store",
    "UnauthenticatedError",
    "UnknownConfigurationKeyError",
    "obs",
    "Config",
    "classify",
    "failure",
    "host",
    "normalise_key",
    "parse",
    "require_obstore",
    "summary",
]

_CLIENT_KEYS: Final = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "http1_only",
        "http2_keep_alive_interval",
        "http2_keep_alive_timeout",
        "http2_keep_alive_while_idle",
        "http2_only",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "root_certificate",
        "timeout",
        "user_agent",
    }
)
_SECRET_KEYS: Final = frozenset({"secret_access_key", "session_token", "token"})
_SECRET_ENV: Final = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_ENDPOINT_ENV: Final = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_ALIASES: Final = {"endpoint_url": "endpoint", "endpoint_url_s3": "aws_endpoint_url_s3"}

#: Temporaries of uploads running in this process, as (bucket, key): never leftovers.


def host() -> str:
    name = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63]
    return name or "host"


def require_obstore() -> None:
    if OBSTORE_MISSING is not None:
        raise ImportError(
            "S3Payloads needs obstore, which comes with the s3 extra: "
            "pip install 'mxm-dataio-async[s3]'"
        ) from OBSTORE_MISSING


# -- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    bucket: str
    prefix: str  # "" for the bucket's root; never with a leading or trailing "/"
    s3: dict[str, str] = field(default_factory=dict)
    client: dict[str, str] = field(default_factory=dict)
    retry: dict[str, Any] = field(default_factory=dict)
    endpoint: str = ""  # for messages, without credentials
    secrets: tuple[str, ...] = ()


def normalise_key(key: str) -> str:
    """Option names as obstore spells them: ``AWS_REGION`` and ``region`` are ``region``."""
    k = key.strip().lower()
    k = k.removeprefix("aws_")
    return _ALIASES.get(k, k)


def parse(url: str, options: Mapping[str, str] | None) -> Config:
    """Split ``s3://bucket/prefix?opts`` and ``options`` into obstore's three settings maps."""
    if not isinstance(url, str):
        raise TypeError(f"an S3 payload store needs an s3://bucket/prefix URL, not {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("s3", "s3a"):
        raise ValueError("an S3 payload store needs an s3://bucket/prefix URL")
    if "@" in parts.netloc:
        # Never echo it: it may hold a secret.
        raise ValueError(
            "credentials do not belong in the bucket part of an s3:// URL: use the AWS_* "
            "variables or the access_key_id= / secret_access_key= options"
        )
    bucket = parts.netloc
    if not bucket:
        raise ValueError("the s3:// URL names no bucket (s3://bucket/prefix)")
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise ValueError("an S3 key prefix cannot contain '.' or '..' segments")
    merged: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        merged[normalise_key(key)] = value
    for key, value in (options or {}).items():
        merged[normalise_key(key)] = str(value)
    if "bucket" in merged:
        raise ValueError("the bucket is the s3:// URL's host; it is not an option")
    s3: dict[str, str] = {}
    client: dict[str, str] = {}
    retry: dict[str, Any] = {"retry_timeout": timedelta(seconds=_RETRY_TIMEOUT)}
    for key, value in merged.items():
        if key in _CLIENT_KEYS:
            client[key] = value
        elif key == "max_retries":
            try:
                retry[key] = int(value)
            except ValueError:
                raise ValueError("the max_retries option must be an integer") from None
        elif key == "retry_timeout":
            try:
                retry[key] = timedelta(seconds=float(value))
            except ValueError:
                raise ValueError("the retry_timeout option must be seconds") from None
        else:
            s3[key] = value
    if client:
        # obstore takes client settings from the environment only when given none: keep them.
        base = {
            key: os.environ[f"AWS_{key.upper()}"]
            for key in _CLIENT_KEYS
            if os.environ.get(f"AWS_{key.upper()}")
        }
        client = {**base, **client}
    if "copy_if_not_exists" not in s3 and not os.environ.get("AWS_COPY_IF_NOT_EXISTS"):
        s3["copy_if_not_exists"] = "multipart"  # the create-only copy put_stream relies on
    endpoint = s3.get("aws_endpoint_url_s3") or s3.get("endpoint") or ""
    if not endpoint:
        endpoint = next((os.environ[v] for v in _ENDPOINT_ENV if os.environ.get(v)), "")
    secrets = [merged[k] for k in _SECRET_KEYS if merged.get(k)]
    secrets += [os.environ[v] for v in _SECRET_ENV if os.environ.get(v)]
    return Config(
        bucket=bucket,
        prefix="/".join(segments),
        s3=s3,
        client=client,
        retry=retry,
        endpoint=_without_userinfo(endpoint),
        secrets=tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)),
    )


def _without_userinfo(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()


# -- error translation (the one place) -------------------------------------------------------------

_XML_CODE: Final = re.compile(r"<Code>([^<]+)</Code>")
_STATUS: Final = re.compile(r"status code: (\d{3})")


def summary(text: str) -> str:
    """obstore's message without its debug dump and response body: one line."""
    first = text.strip().splitlines()[0] if text.strip() else text
    head, _, _ = first.partition("<?xml")
    head = head.rstrip(": ")
    code = _XML_CODE.search(text)
    if code and code.group(1) not in head:
        head = f"{head} ({code.group(1)})"
    return head


def _masked(exc: BaseException, config: Config) -> str:
    text = str(exc)
    for secret in config.secrets:
        text = text.replace(secret, "***")
    return text


def classify(exc: BaseException | None) -> str:
    """What went wrong, for the hint: ``denied``, ``no-bucket``, ``http``, ``unreachable``,
    ``option`` or ``other``."""
    if exc is None:
        return "other"
    text = str(exc)
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else None
    code_match = _XML_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
        return "denied"
    if code == "NoSuchBucket" or (status == 404 and "NoSuchKey" not in text):
        return "no-bucket"
    if "builder error" in text:
        return "http"
    if status is None and any(
        s in text for s in ("error sending request", "onnection", "timed out", "dns error")
    ):
        return "unreachable"
    if isinstance(exc, UnknownConfigurationKeyError):
        return "option"
    return "other"


def failure(exc: BaseException, action: str, where: str, config: Config) -> StoreError:
    """The StoreError for an obstore (or network) error; says what to check. The one place
    obstore's errors are translated (secrets masked, should a server echo one)."""
    endpoint = config.endpoint or "the default AWS endpoint"
    kind = classify(exc)
    if kind == "denied":
        hint = (
            f"access denied by {endpoint}: check the credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or the access_key_id= / secret_access_key= options) and "
            f"that they may read and write bucket {config.bucket!r}"
        )
    elif kind == "no-bucket":
        hint = f"bucket {config.bucket!r} does not exist at {endpoint}"
    elif kind == "http":
        hint = (
            f"cannot use the endpoint {endpoint}: for a plain http:// endpoint set "
            "AWS_ALLOW_HTTP=true or the allow_http=true option"
        )
    elif kind == "unreachable":
        hint = (
            f"cannot reach the S3 endpoint {endpoint}: is the server running? check "
            "AWS_ENDPOINT_URL (or the endpoint= option) and the network"
        )
    elif kind == "option":
        hint = "unknown S3 option (see obstore's S3Config and ClientConfig keys)"
    else:
        hint = "the S3 request failed"
    return StoreError(f"cannot {action} {where}: {hint} [{summary(_masked(exc, config))}]")
