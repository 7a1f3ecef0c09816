"""The ``mxm-dataio`` command line (needs the ``cli`` extra: typer and rich): ``app`` and
``main``, the console script.

Each command module registers its commands on the one ``app`` as it is imported: shared pieces
in ``_common.py``; ``demo`` in ``_demo.py``; the read commands in ``_inspect.py``; verify, gc,
prune, export and import in ``_manage.py``; run in ``_jobs.py``; tail in ``_tail.py``; worker
and status (runs shared by many workers) in ``_workers.py``; datasets in ``_datasets.py``.

Commands reach the store only through the public ``Store`` API (``_common._with_store`` opens
one, runs the command's coroutine with ``anyio.run`` and closes it); no command knows how the
store keeps its rows or bytes. The read commands (sessions, show, meta, cat, stats, verify and
export) open it with ``Store(root, read_only=True)``: nothing is created or changed, and a missing
store is an error. gc, prune and tail (which writes checkpoints) open an existing store only
(``create=False``); import creates one if need be. Writes go through the store's own
transactions, which wait for a writer in another process (``busy_timeout``) rather than failing
or interleaving.
"""

from mxm_dataio_async._cli._common import app

# Imported for their commands, in the order --help lists them (first the guard in _common: a
# clear message without the extra).
from mxm_dataio_async._cli import _demo, _inspect, _manage, _jobs, _tail, _workers, _datasets  # noqa: F401  # isort: skip

__all__ = ["app", "main"]


def main() -> None:
    app()
