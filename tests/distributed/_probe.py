"""A client run inside a host namespace: can this host reach these services?

``python _probe.py [--timeout T] URL...`` tries every URL at once, each within T seconds, and
prints one JSON object ``{url: "ok" | "<error>"}``:

- ``tcp://ADDR:PORT``: a TCP connection is accepted;
- ``redis://ADDR:PORT[/DB]``: PING answers PONG (raw RESP: no client library needed);
- ``postgresql://USER:PASSWORD@ADDR:PORT/DB``: ``SELECT 1`` returns 1 (asyncpg);
- ``http://ADDR:PORT/PATH``: a GET answers 2xx.

``python _probe.py --timeout T hold redis://...`` keeps ONE connection: it prints ``connected``,
then for each ``ping`` line on stdin sends PING and prints ``ok``, ``timeout`` (no answer in T;
the answer still owed is awaited before the next one) or ``closed: <why>``. It never reconnects,
so ``ok`` after a partition means the same TCP connection survived it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import urlsplit

PING = b"*1\r\n$4\r\nPING\r\n"


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    return f"{type(e).__name__}: {e}"


async def _tcp(url: str) -> None:
    parts = urlsplit(url)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.close()
    await writer.wait_closed()


async def _redis_connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
    if parts.password:
        password = parts.password.encode()
        writer.write(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password))
        reply = await reader.readline()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"AUTH answered {reply!r}")
    return reader, writer


async def _redis(url: str) -> None:
    reader, writer = await _redis_connect(url)
    try:
        writer.write(PING)
        reply = await reader.readline()
        if reply != b"+PONG\r\n":
            raise RuntimeError(f"PING answered {reply!r}")
    finally:
        writer.close()


async def _postgres(url: str, seconds: float) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url, timeout=seconds)
    try:
        value = await conn.fetchval("SELECT 1")
        if value != 1:
            raise RuntimeError(f"SELECT 1 returned {value!r}")
    finally:
        await conn.close(timeout=seconds)


async def _http(url: str, seconds: float) -> None:
    import aiohttp

    client_timeout = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.get(url) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"HTTP {resp.status}")


async def check(url: str, seconds: float) -> str:
    scheme = urlsplit(url).scheme
    try:
        async with asyncio.timeout(seconds):
            if scheme == "tcp":
                await _tcp(url)
            elif scheme == "redis":
                await _redis(url)
            elif scheme in ("postgresql", "postgres"):
                await _postgres(url, seconds)
            elif scheme == "http":
                await _http(url, seconds)
            else:
                return f"unknown scheme {scheme!r}"
    except Exception as e:
        return _describe(e)
    return "ok"


async def check_all(urls: list[str], seconds: float) -> dict[str, str]:
    results = await asyncio.gather(*(check(url, seconds) for url in urls))
    return dict(zip(urls, results, strict=True))


def _say(line: str) -> None:
    print(line, flush=True)


async def hold(url: str, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            reader, writer = await _redis_connect(url)
    except Exception as e:
        _say(f"closed: {_describe(e)}")
        return
    _say("connected")
    owed = 0
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        if line.strip() != "ping":
            _say(f"unknown command {line.strip()!r}")
            continue
        writer.write(PING)
        owed += 1
        try:
            async with asyncio.timeout(seconds):
                while owed:
                    reply = await reader.readline()
                    if not reply:
                        _say("closed: EOF")
                        return
                    owed -= 1
        except TimeoutError:
            _say("timeout")
            continue
        except OSError as e:
            _say(f"closed: {_describe(e)}")
            return
        _say("ok")
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("urls", nargs="+")
    args = parser.parse_args()
    if args.urls[0] == "hold":
        asyncio.run(hold(args.urls[1], args.timeout))
    else:
        print(json.dumps(asyncio.run(check_all(args.urls, args.timeout))))


if __name__ == "__main__":
    main()
