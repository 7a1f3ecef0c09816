"""The ``mxm-dataio`` command line (needs the ``cli`` extra: typer and rich): ``app`` and
``main``, the console script.

Each command module registers its commands on the one ``app`` as it is imported: shared pieces
in ``_common.py``; ``demo`` in ``_demo.py``; the read commands in ``_inspect.py``; verify, gc,
prune, export and import in ``_manage.py``; run and tail in ``_jobs.py``. Read commands open
``<root>/dataio.sqlite`` with a short-lived connection and never create a store; writing commands
(gc, prune, import) share the store's maintenance code (``_store/_cleanup.py``,
``_store/_bundle.py``), which takes SQLite's write lock with ``BEGIN IMMEDIATE`` and waits for a
writer in another process (``busy_timeout``) rather than failing or interleaving.
"""

from mxm_dataio_async._cli._common import app

# Imported for their commands, in the order --help lists them (first the guard in _common: a
# clear message without the extra).
from mxm_dataio_async._cli import _demo, _inspect, _manage, _jobs  # noqa: F401  # isort: skip

__all__ = ["app", "main"]


def main() -> None:
    app()
