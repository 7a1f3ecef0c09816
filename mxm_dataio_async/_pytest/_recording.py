"""A test's recording on disk: an unpacked session bundle, readable in review.

Layout of ``<test dir>/recordings/<module>/<test>/``::

    manifest.json        the bundle manifest, plus a one-line summary of each interaction
    sessions.jsonl       the audit rows, as ``mxm-dataio export`` writes them
    requests.jsonl
    responses.jsonl
    payloads/<sha256>    the exact bytes of each payload, one plain file each

It is a bundle (``_store/_bundle.py``) laid out as a folder instead of a tar, so loading and saving
reuse the store's own export and import: loading packs the folder into a tar and imports it
(every payload verified against its sha256 before a row is written); saving exports each session
of the test's store and unpacks the bundles into one folder. A hand-edited payload fails the
import, so a replay serves exactly the recorded bytes or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, quote_plus

import anyio.to_thread

from mxm_dataio_async._exceptions import DataIOError, StoreError
from mxm_dataio_async._redact import REDACTED, Redaction
from mxm_dataio_async._store import Store

__all__ = ["Interaction", "RecordingDir", "SecretInRecording", "SecretLeak"]

MANIFEST: Final = "manifest.json"
_TABLES: Final = ("sessions", "requests", "responses")


class SecretInRecording(DataIOError):
    """A configured secret value would have been written to a recording (nothing was written)."""


@dataclass(frozen=True, slots=True)
class SecretLeak:
    where: str  # the file of the recording, e.g. "requests.jsonl" or "payloads/<sha256>"
    what: str  # the row or response it is in, for the message


@dataclass(frozen=True, slots=True)
class Interaction:
    """One recorded response of a request identity, as the index keeps it (file order)."""

    response_id: str
    request_id: str
    status: str
    sequence: int | None
    transport_status: int | None


@dataclass(slots=True)
class RecordingDir:
    """The folder of one test's recording."""

    path: Path
    _index: dict[str, list[Interaction]] | None = field(default=None, init=False, repr=False)

    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    # -- loading --------------------------------------------------------------------------------

    async def load_into(self, store: Store) -> None:
        """Import the recording into ``store`` (verified; nothing if it is incomplete)."""
        with tempfile.TemporaryDirectory(prefix="dataio-load-") as tmp:
            tar = Path(tmp) / "recording.tar"
            await anyio.to_thread.run_sync(self._pack, tar)
            await store.import_bundle(tar)

    def _pack(self, tar_path: Path) -> None:
        with tarfile.open(tar_path, "w") as tar:
            for name in (MANIFEST, *(f"{t}.jsonl" for t in _TABLES)):
                tar.add(self.path / name, arcname=name, recursive=False)
            payloads = self.path / "payloads"
            if payloads.is_dir():
                for item in sorted(payloads.iterdir()):
                    tar.add(item, arcname=f"payloads/{item.name}", recursive=False)

    def index(self) -> dict[str, list[Interaction]]:
        """Request hash -> its recorded responses, in recording order (empty without one)."""
        if self._index is None:
            index: dict[str, list[Interaction]] = {}
            if self.exists():
                for row in _read_jsonl(self.path / "responses.jsonl"):
                    index.setdefault(str(row["request_hash"]), []).append(
                        Interaction(
                            str(row["id"]),
                            str(row["request_id"]),
                            str(row["status"]),
                            row.get("sequence"),
                            row.get("transport_status"),
                        )
                    )
            self._index = index
        return self._index

    # -- saving ---------------------------------------------------------------------------------

    async def save_from(
        self,
        store: Store,
        *,
        test: str,
        secrets: Sequence[str] = (),
        redaction: Redaction | None = None,
        merge_old: bool = False,
    ) -> int:
        """Write every session of ``store`` that recorded something as this recording,
        replacing it (the old interactions kept first when ``merge_old``). Returns how many
        responses it holds. ``redaction``: names redacted on top of what the sessions redacted
        (the test's own). ``SecretInRecording`` if any of ``secrets`` is in a row or a payload:
        then nothing is written."""
        if merge_old and self.exists():
            await self.load_into(store)
        with tempfile.TemporaryDirectory(prefix="dataio-save-") as tmp:
            bundles = []
            for n, session in enumerate(reversed(await store.list_sessions())):
                if not await _has_responses(store, session.id):
                    continue  # only served from the recording: nothing to keep
                out = Path(tmp) / f"{n}.tar"
                await store.export_session(session.id, out)
                bundles.append(out)
            staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
            return await anyio.to_thread.run_sync(
                lambda: self._unpack(
                    bundles, staging, test=test, secrets=secrets, redaction=redaction
                )
            )

    def _unpack(
        self,
        bundles: list[Path],
        staging: Path,
        *,
        test: str,
        secrets: Sequence[str],
        redaction: Redaction | None,
    ) -> int:
        rows: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in _TABLES}
        manifest: dict[str, Any] = {}
        payloads: dict[str, int] = {}
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "payloads").mkdir(parents=True)
        try:
            for bundle in bundles:
                with tarfile.open(bundle) as tar:
                    head = json.loads(_member(tar, MANIFEST))
                    manifest = manifest or head
                    for table in _TABLES:
                        for line in _member(tar, f"{table}.jsonl").splitlines():
                            if line.strip():
                                row = json.loads(line)
                                rows[table].setdefault(str(row["id"]), row)
                    for entry in head.get("payloads", []):
                        digest = str(entry["sha256"])
                        if digest not in payloads:
                            data = _member(tar, f"payloads/{digest}")
                            (staging / "payloads" / digest).write_bytes(data)
                            payloads[digest] = int(entry["size"])
            if redaction is not None:
                _redact_rows(rows, redaction)
            leaks = _leaks(rows, staging / "payloads", payloads, secrets)
            if leaks:
                raise SecretInRecording(_leak_message(self.path, leaks))
            for table in _TABLES:
                with (staging / f"{table}.jsonl").open("w", encoding="utf-8") as f:
                    for row in rows[table].values():
                        f.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False))
                        f.write("\n")
            summary = {
                "format": manifest.get("format"),
                "version": manifest.get("version"),
                "schema_version": manifest.get("schema_version"),
                "recorded_by": "mxm_dataio_async.pytest_plugin",
                "test": test,
                "session_id": next(iter(rows["sessions"]), None),
                "counts": {t: len(rows[t]) for t in _TABLES},
                "interactions": _interactions(rows),
                "payloads": [{"sha256": d, "size": s} for d, s in sorted(payloads.items())],
            }
            (staging / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            _replace_dir(staging, self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._index = None
        return len(rows["responses"])


# -- helpers -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StoreError(f"cannot read recording file {path}: {exc.strerror or exc}") from exc
    return [json.loads(line) for line in lines if line.strip()]


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise StoreError(f"bundle member {name} is not a file")
    return f.read()


async def _has_responses(store: Store, session_id: str) -> bool:
    async for _row in store.iter_rows("responses", session_id=session_id):
        return True
    return False


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` where ``target`` is, the old one removed only once the new one is in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _redact_rows(rows: dict[str, dict[str, dict[str, Any]]], red: Redaction) -> None:
    """Apply a test's extra names to rows the sessions already redacted with their own."""

    def headers(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        value = json.loads(text)
        return json.dumps(red.headers_of(value)) if isinstance(value, dict) else text

    for row in rows["requests"].values():
        row["headers"] = headers(row.get("headers"))
        if isinstance(row.get("params"), str):
            params = json.loads(row["params"])
            if isinstance(params, dict):
                row["params"] = json.dumps(
                    {k: (REDACTED if red.is_secret_param(k) else v) for k, v in params.items()},
                    separators=(",", ":"),
                )
        if isinstance(row.get("endpoint"), str):
            row["endpoint"] = red.url(row["endpoint"])
    for row in rows["responses"].values():
        row["headers"] = headers(row.get("headers"))
        if isinstance(row.get("url"), str):
            row["url"] = red.url(row["url"])
        if isinstance(row.get("adapter_meta"), str):
            meta = json.loads(row["adapter_meta"])
            if isinstance(meta, dict):
                if isinstance(meta.get("request_headers"), dict):
                    meta["request_headers"] = red.headers_of(meta["request_headers"])
                for hop in meta.get("redirects") or []:
                    if isinstance(hop, dict):
                        hop["url"] = red.url(hop.get("url"))
                        hop["location"] = red.url(hop.get("location"))
                        if isinstance(hop.get("headers"), dict):
                            hop["headers"] = red.headers_of(hop["headers"])
                row["adapter_meta"] = json.dumps(meta)


def _forms(secret: str) -> list[bytes]:
    """The ways a value shows in a row or a payload: as is, URL-encoded, JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    return [f.encode() for f in forms if f]


def _leaks(
    rows: dict[str, dict[str, dict[str, Any]]],
    payload_dir: Path,
    payloads: dict[str, int],
    secrets: Iterable[str],
) -> list[SecretLeak]:
    needles = [form for s in secrets if s for form in _forms(s)]
    if not needles:
        return []
    leaks: list[SecretLeak] = []
    for table in _TABLES:
        for row in rows[table].values():
            text = json.dumps(row, ensure_ascii=False).encode()
            if any(n in text for n in needles):
                leaks.append(SecretLeak(f"{table}.jsonl", _describe_row(table, row)))
    holders = {
        str(r["checksum"]): _describe_row("responses", r)
        for r in rows["responses"].values()
        if r.get("checksum")
    }
    for digest in payloads:
        data = (payload_dir / digest).read_bytes()
        if any(n in data for n in needles):
            leaks.append(SecretLeak(f"payloads/{digest}", holders.get(digest, "a sent payload")))
    return leaks


def _describe_row(table: str, row: dict[str, Any]) -> str:
    if table == "sessions":
        return f"session {row.get('id')} ({row.get('source')})"
    what = f"{row.get('source')}/{row.get('kind')}"
    if table == "requests":
        return f"request {row.get('method')} {row.get('endpoint')} ({what})"
    return f"the response to {what} ({row.get('status')}, id {row.get('id')})"


def _leak_message(path: Path, leaks: list[SecretLeak]) -> str:
    first = "; ".join(f"{leak.where}: {leak.what}" for leak in leaks[:5])
    more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
    return (
        f"a configured secret value would be written to the recording {path}: {first}{more}. "
        "Nothing was written. Redact it (the adapter's Redaction, or "
        "@pytest.mark.dataio(redact_headers=..., redact_params=...)) and record again."
    )


def _interactions(rows: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One short line per recorded response, for a reviewer reading the manifest."""
    requests = rows["requests"]
    out = []
    for r in rows["responses"].values():
        q = requests.get(str(r["request_id"]), {})
        item: dict[str, Any] = {
            "source": r.get("source"),
            "kind": r.get("kind"),
            "method": q.get("method"),
            "endpoint": q.get("endpoint"),
            "params": json.loads(q["params"]) if isinstance(q.get("params"), str) else None,
            "status": r.get("status"),
        }
        for key in ("transport_status", "sequence", "error"):
            if r.get(key) is not None:
                item[key] = r[key]
        if r.get("checksum"):
            item["payload"] = f"payloads/{r['checksum']}"
            item["size"] = r.get("size_bytes")
        out.append({k: v for k, v in item.items() if v is not None})
    return out
