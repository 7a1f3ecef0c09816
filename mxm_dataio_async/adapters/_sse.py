"""An incremental ``text/event-stream`` parser (WHATWG HTML, "Server-sent events", §9.2.6).

Pure: bytes in, events out, no I/O, so the adapter's reconnect logic stays separate and this part
is tested on its own. Lines end with CRLF, LF or CR (a CR at the end of one chunk and an LF at the
start of the next are one line ending); a leading BOM is dropped; an event still incomplete when
the connection ends is discarded, as the spec says.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "SSEError"]

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEError(ValueError):
    """The event stream broke a limit (a line or an event larger than allowed)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its ``data`` lines joined by newlines, its type, the last event id."""

    data: str
    event: str = "message"
    id: str = ""


class SSEDecoder:
    """Feed it byte chunks; it returns the events they complete.

    ``last_event_id`` and ``retry`` (the server's reconnection time in ms, or ``None``) persist
    across events, as they must across reconnections. ``max_size`` bounds the characters buffered
    for one line or one event (``SSEError`` beyond it), so a hostile stream cannot exhaust memory.
    """

    __slots__ = (
        "_bom_checked",
        "_data",
        "_data_size",
        "_decoder",
        "_event",
        "_id",
        "_pending",
        "_skip_lf",
        "last_event_id",
        "max_size",
        "retry",
    )

    def __init__(self, *, last_event_id: str = "", max_size: int | None = None) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._skip_lf = False
        self._bom_checked = False
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._id = last_event_id
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self.max_size = max_size

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse ``chunk``; return the events it completed (possibly none)."""
        text = self._decoder.decode(chunk)
        if not text:
            return []
        if not self._bom_checked:
            self._bom_checked = True
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        if self._pending:
            text = self._pending + text
            self._pending = ""
        events: list[SSEEvent] = []
        pos = 0
        for m in _LINE_END.finditer(text):
            end = m.end()
            if end == len(text) and m.group() == "\r":
                # The LF of a CRLF may arrive with the next chunk: swallow it then.
                self._skip_lf = True
            event = self._line(text[pos : m.start()])
            if event is not None:
                events.append(event)
            pos = end
        rest = text[pos:]
        if rest:
            if self.max_size is not None and len(rest) > self.max_size:
                raise SSEError(f"event-stream line longer than {self.max_size} characters")
            self._pending = rest
        return events

    def end(self) -> None:
        """The connection ended: drop any partial line or undispatched event (per the spec)."""
        self._decoder.reset()
        self._pending = ""
        self._skip_lf = False
        self._data = []
        self._data_size = 0
        self._event = ""

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None  # comment (servers send these as keep-alives)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self.max_size is not None and self._data_size > self.max_size:
                raise SSEError(f"event-stream event larger than {self.max_size} characters")
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field name is ignored, as the spec requires.
        return None

    def _dispatch(self) -> SSEEvent | None:
        self.last_event_id = self._id
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id)
        self._data = []
        self._data_size = 0
        self._event = ""
        return event
