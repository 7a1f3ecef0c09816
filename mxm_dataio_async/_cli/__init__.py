"""The ``mxm-dataio`` command line: ``app`` (typer) and ``main``, the console script."""

from mxm_dataio_async._cli._common import app, main

__all__ = ["app", "main"]
