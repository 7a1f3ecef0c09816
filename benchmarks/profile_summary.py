"""Summarise a py-spy raw profile (``py-spy record -f raw``) of a benchmark trial by component.

    python benchmarks/profile_summary.py prof.txt            # components, then top functions
    python benchmarks/profile_summary.py prof.txt --top 40

Only samples of the event-loop thread while the loop runs count toward the shares (imports and
other threads are reported apart). Each sample goes to the component of the deepest frame that
names one, so a socket write under aiohttp counts as transport and JSON under the identity code
counts as identity. Samples of aiosqlite's thread waiting for work (``tx.get()``) are idle time and
are left out; the rest of that thread is the SQLite work done beside the loop.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# The first pattern that matches a frame, walking from the leaf up, names the component.
COMPONENTS: list[tuple[str, str]] = [
    ("asyncio transport + epoll (socket syscalls)", r"selector_events\.py|selectors\.py"),
    ("aiohttp client machinery", r"aiohttp/|yarl/|multidict/"),
    ("anyio (tasks, cancel scopes, events, streams)", r"anyio/"),
    ("aiosqlite (loop side)", r"aiosqlite/"),
    ("store: rows, reader/writer tasks", r"mxm_dataio_async/_store/"),
    ("request building + identity (canonical JSON, sha256)", r"_identity\.py|_request\.py"),
    ("bulk (fetch_many)", r"_bulk\.py"),
    ("coalescer", r"_coalesce\.py"),
    ("retry wrapper", r"_retry\.py"),
    ("limiter", r"_limits\.py"),
    ("redaction", r"_redact\.py"),
    ("models (ids, timestamps, dataclasses)", r"_models\.py"),
    ("adapter (own code)", r"mxm_dataio_async/adapters/"),
    ("pipeline (plan, attempts)", r"_pipeline\.py|_policy\.py"),
    ("recorder (rows, redaction, counts)", r"_recorder\.py"),
    ("session (facade, lifecycle)", r"_session\.py"),
    ("clock", r"_clock\.py"),
    ("benchmark driver", r"http_bench\.py|_common\.py"),
]
_LOOP_TOP = re.compile(r"Handle\._run|_run_once|run_forever|Runner\.run")
_NATIVE_LOOP = re.compile(r"Runner\.run|run_until_complete")  # uvloop's C code has no frames
_HARNESS = re.compile(r"<module>|main \(|_trial|run \(_common|run_until_complete")
_IDLE = re.compile(r"_connection_worker_thread \(aiosqlite/core\.py|Condition\.wait|Queue\.get")


def _short(frame: str) -> str:
    return re.sub(r" \((.*?):\d+\)", r" (\1)", frame)


def _load(path: Path) -> list[tuple[list[str], int]]:
    rows = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append((stack.split(";"), int(count)))
    return rows


def _component(stack: list[str]) -> str:
    if _NATIVE_LOOP.search(stack[-1]):
        return "event loop native code (uvloop: epoll, sockets, scheduling)"
    for frame in reversed(stack):
        if _LOOP_TOP.search(frame):
            break
        for name, pattern in COMPONENTS:
            if re.search(pattern, frame):
                return name
    return "asyncio loop scheduling (run_once, handles, futures)"


def summarise(path: Path, top: int) -> str:
    rows = _load(path)
    loop = [
        (s, n) for s, n in rows if "_bootstrap" not in s[0] and any("Runner.run" in f for f in s)
    ]
    threads = [(s, n) for s, n in rows if "_bootstrap" in s[0]]
    busy = [(s, n) for s, n in threads if not _IDLE.search(s[-1])]
    total = sum(n for _, n in rows)
    in_loop = sum(n for _, n in loop) or 1
    in_threads = sum(n for _, n in busy)
    idle = sum(n for _, n in threads) - in_threads
    outside = total - in_loop - sum(n for _, n in threads)
    out = [
        f"{total} samples: event-loop thread {in_loop}, other threads busy {in_threads} "
        f"({in_threads / in_loop:.0%} of the loop's), other threads idle "
        f"{idle}, outside the loop (imports, setup) {outside}",
        "",
        "share of event-loop samples, by component:",
    ]
    components: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, n in loop:
        components[_component(stack)] += n
        for frame in {_short(f) for f in stack}:
            inclusive[frame] += n
        own[_short(stack[-1])] += n
    out += [f"  {n / in_loop:6.1%}  {name}" for name, n in components.most_common()]
    out += ["", "inclusive (function and what it calls):"]
    shown = 0
    for frame, n in inclusive.most_common():
        if _LOOP_TOP.search(frame) or _HARNESS.search(frame):
            continue
        out.append(f"  {n / in_loop:6.1%}  {frame}")
        shown += 1
        if shown >= top:
            break
    out += ["", "self (the function's own lines):"]
    out += [f"  {n / in_loop:6.1%}  {frame}" for frame, n in own.most_common(top // 2)]
    if busy:
        leaves: Counter[str] = Counter()
        for stack, n in busy:
            leaves[" <- ".join(_short(f) for f in stack[-1:-3:-1])] += n
        out += ["", "other threads, busy (share of their busy samples):"]
        out += [f"  {n / in_threads:6.1%}  {leaf}" for leaf, n in leaves.most_common(8)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("profile", type=Path, help="py-spy record -f raw output")
    parser.add_argument("--top", type=int, default=30, help="functions listed")
    args = parser.parse_args()
    print(summarise(args.profile, args.top))


if __name__ == "__main__":
    main()
