"""The statements that tie a recording to its run's claim, run by the writer in the transaction
that records the rows (``_writer.py``) and by the work queue (``_work.py``).

``FENCE_SQL`` locks the claimed chunks ``FOR SHARE`` while checking owner and lease, so a claim
cannot pass to another worker between the check and the commit (the other worker's claim skips
the locked row until then); ``DONE_SQL`` marks plan indices done, idempotently.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DONE_SQL", "FENCE_SQL"]

#: The claims of a batch that still hold, locked until the batch commits: ``$1`` run ids, ``$2``
#: chunks, ``$3`` owners (one array element per fenced job).
FENCE_SQL: Final = (
    "SELECT c.run_id, c.chunk, c.owner FROM job_chunks AS c "
    "JOIN unnest($1::text[], $2::int[], $3::text[]) AS f (run_id, chunk, owner) "
    "ON c.run_id = f.run_id AND c.chunk = f.chunk AND c.owner = f.owner "
    "WHERE c.state = 'claimed' AND c.lease_until > clock_timestamp() "
    "ORDER BY c.run_id, c.chunk FOR SHARE OF c"
)
#: Plan indices done: ``$1`` run ids, ``$2`` indices, ``$3`` sources, ``$4`` response ids,
#: ``$5`` outcomes (``fetched``: answered upstream and recorded; ``cached``; ``failed``).
DONE_SQL: Final = (
    "INSERT INTO job_done (run_id, idx, source, response_id, outcome) "
    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[]) "
    "ON CONFLICT (run_id, idx) DO NOTHING"
)
