"""``S3Payloads``: the :class:`PayloadStore` on S3-compatible object storage, through obstore.

``S3Payloads("s3://bucket/prefix")`` keeps a payload at ``<prefix>/ab/cd/<sha256>`` (the key layout
of ``LocalPayloads``) and nothing else outside ``<prefix>/tmp/``. obstore is the ``s3`` extra
(``pip install 'mxm-dataio-async[s3]'``): this module imports without it, and constructing an
``S3Payloads`` then raises an ImportError naming the extra.

Configuration: the endpoint, region and credentials come from the standard ``AWS_*`` variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ALLOW_HTTP`` ...), overridden by the URL's query options
(``s3://bucket/prefix?endpoint=http://127.0.0.1:8333&region=us-east-1&allow_http=true``),
overridden in turn by ``options=``. Keys are obstore's S3 and client settings (``endpoint``,
``region``, ``access_key_id``, ``secret_access_key``, ``session_token``, ``allow_http``,
``connect_timeout``, ``timeout`` ...), plus ``max_retries`` and ``retry_timeout`` (seconds).
``location`` is ``s3://bucket/prefix`` without the query, and no message this class raises
carries a secret (they are masked if a server echoes one). An object's ``location`` (in
``StoredObject``, verify and gc reports) is ``<bucket>/<key>``: the facade reports it through
``Path``, which would fold the ``//`` of an ``s3://`` URL.

Writes:
- ``put(digest, data)`` is one create-only PUT (``If-None-Match: *``, obstore's ``mode="create"``):
  the object appears whole or not at all, and "already exists" is success (the same bytes, by
  their sha256). SeaweedFS honours the precondition under an 8-way race (shared/INFRA.md). It
  returns once S3 has acknowledged the write, i.e. durable.
- ``put_stream(chunks)`` cannot name the object before the last byte (the key is the sha256). A
  body of up to ``part_size`` bytes (8 MiB) is buffered and stored with ``put``: no temporaries.
  A larger one is uploaded while it is hashed, as a multipart upload (parts of ``part_size``,
  ``part_concurrency`` = 2 in flight: memory stays near ``part_size * (part_concurrency + 1)``,
  24 MiB, whatever the size) to ``<prefix>/tmp/<host>/<pid>-<uuid>``, then copied server-side to
  its content address with a create-only copy (obstore's ``copy_if_not_exists="multipart"``: one
  ``UploadPartCopy`` completed with ``If-None-Match: *``, which SeaweedFS and AWS honour; skipped
  if the object is already there, replaced if one of another size, i.e. corrupt, is), and the
  temporary is deleted. Measured on SeaweedFS here (2 cores, benchmarks/backends_s3.py): 256 MiB
  streamed at ~110 MB/s (the copy is ~0.8 s of it), peak RSS +8-15 MiB over a process that
  streamed 9 MiB; 4 parts in flight were no faster and cost +23-28 MiB, 8 parts +55-61 MiB (raise
  ``part_concurrency`` for a distant endpoint; AWS refuses parts under 5 MiB). Alternatives
  rejected: one streamed PUT needs the length up front and, in obstore, the whole body in memory;
  a local spool file doubles the writes and still needs a multipart upload for the final object;
  a copy that overwrites would be safe too (the same bytes), but create-only never rewrites a
  good object.
- The source is read in the caller's task (its context and cancel scopes stay where they were
  entered; its error propagates as itself) and handed to obstore through a rendezvous channel.
  obstore's upload is never cancelled from outside (dropping it would orphan the upload): when
  the source fails or the caller is cancelled, the channel ends, obstore completes the upload
  with what it has (waiting for the parts in flight), and that short temporary is deleted; only
  then does the error propagate. (Ending the channel with an error made obstore abort while a
  part was still being written: SeaweedFS finished that part after the abort and the upload came
  back, hidden, about one time in ten.)

Crash safety (a process killed mid-write):
- Before a multipart upload starts, an empty *marker* object is created at its temporary key.
  A crash at any point before the end leaves that marker (or the complete temporary, if the
  crash came after the upload and before the copy). ``leftovers(grace)`` reports every temporary
  whose writer is not alive (same host: its pid is gone; another host: older than ``grace``;
  this process's own live uploads never), ``delete()`` removes it, and ``open()`` removes those
  of dead writers on this host at once.
- What obstore cannot reach: the parts of the interrupted multipart upload itself. S3 keeps them
  out of listings until the upload is aborted, and obstore 0.12 can neither list nor abort
  uploads. The marker makes such a crash visible (verify reports the leftover); the parts need the
  bucket's ``AbortIncompleteMultipartUpload`` lifecycle rule (AWS, MinIO) or the server's own
  tools (SeaweedFS keeps them under ``/buckets/<bucket>/.uploads/``). A failing source or a
  cancelled write leaves neither (the test suite checks ``.uploads`` on SeaweedFS).
- No row ever names bytes that are not there: ``put``/``put_stream`` return only after the
  object is complete at its content address (the Store's rule does the rest).
- A streamed body above 5 GiB cannot be copied on AWS (5 GiB per copy request; obstore's
  create-only copy is one ``UploadPartCopy``): it fails with a StoreError and leaves a temporary
  for gc. (``put`` of bytes has S3's 5 GiB single-PUT limit anyway.)

Reads are verified: ``get`` checks the size (before downloading) and the sha256; ``iter`` reads
in ranges of ``read_window`` bytes (so a slow consumer never outlives one request's timeout),
hashing as it goes, and raises ``IntegrityError`` at the end at the latest. A missing object is an
``IntegrityError``. ``stat`` is a HEAD (age from Last-Modified, seconds resolution on SeaweedFS);
``list`` pages through ``<prefix>/`` (1000 keys a request) skipping ``tmp/``; a key that is not
``ab/cd/<sha256>`` is listed with ``digest=None``. Re-putting bytes already stored does not renew
their Last-Modified (a local file is touched): see the gc window in ``_cleanup``.

Errors: every obstore or network error goes through :func:`_failure`, which turns it into a
``StoreError`` saying what to check (the endpoint and ``AWS_ENDPOINT_URL``/``allow_http`` for an
unreachable server, the credentials for a 403, the bucket for a 404 on the bucket). obstore
retries a failing request (10 times by default); this class bounds the retries to 30 s
(``retry_timeout``) instead of obstore's 180 s, so that a fetch fails within a bounded time when S3
is down. ``open()`` raises for refused credentials or a missing bucket, but not for an unreachable
server: the store opens, payloads kept inline still record, and each call that needs S3 fails
with a StoreError until it answers.

Process exit: obstore completes each awaited call from one of its threads, which may still be
returning from waking the event loop when ``asyncio.run`` returns; if the interpreter finalizes
in that instant, that thread aborts the process (SIGABRT after all the work is done; 8 exits in
25 right after a call, here). ``aclose()`` yields to those threads for 10 ms (1 ms sufficed in 25
of 25).
"""

from mxm_dataio_async._store._s3._payloads import S3Payloads

__all__ = ["S3Payloads"]
