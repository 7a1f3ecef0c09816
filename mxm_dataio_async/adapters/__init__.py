"""Adapters: the protocols, and the built-in implementations."""

from mxm_dataio_async.adapters.base import Closable, Fetcher, Revalidator, Sender, Streamer
from mxm_dataio_async.adapters.files import FileAdapter
from mxm_dataio_async.adapters.http import HttpAdapter
from mxm_dataio_async.adapters.mock import MockAdapter

__all__ = [
    "Closable",
    "FileAdapter",
    "Fetcher",
    "HttpAdapter",
    "MockAdapter",
    "Revalidator",
    "Sender",
    "Streamer",
]
