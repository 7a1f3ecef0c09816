from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mxm_dataio_async._demo import run_demo

pytestmark = pytest.mark.anyio


async def test_demo_records_then_serves_from_cache(tmp_path: Path) -> None:
    summary = await run_demo(tmp_path / "store", count=40, concurrency=8)
    first, second = summary.passes
    assert (first.fetched, first.from_cache, first.failed) == (40, 0, 0)
    assert (second.fetched, second.from_cache, second.failed) == (0, 40, 0)
    assert summary.upstream_hits == 40 and summary.verified == 40
    conn = sqlite3.connect(tmp_path / "store" / "dataio.sqlite")
    assert conn.execute("SELECT count(*), sum(status = 'ok') FROM sessions").fetchone() == (2, 2)
    assert conn.execute(
        "SELECT count(*) FROM requests WHERE served_from IS NOT NULL"
    ).fetchone() == (40,)


def test_demo_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxm_dataio_async",
            "demo",
            "--root",
            str(tmp_path / "s"),
            "--count",
            "25",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "payloads verified: 25" in out.stdout
    assert (tmp_path / "s" / "dataio.sqlite").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "mxm_dataio_async", "demo", "--count", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0


README = Path(__file__).resolve().parents[1] / "README.md"


def _example_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Example") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


async def test_the_readme_example_finishes_in_seconds_and_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: the example made 10,000 requests at 10/s (17 minutes) and printed nothing
    until the end. Run against a loopback server, with a fake clock for its rate limit: the
    time its limit imposes is seconds, and it prints progress as it goes."""
    from aiohttp import web

    import mxm_dataio_async as dio
    from mxm_dataio_async.testing import FakeClock
    from tests._serve import serving

    hits: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"path": request.path, "query": dict(request.query)})

    app = web.Application()
    app.router.add_get("/quote", answer)
    app.router.add_get("/bars/{n}", answer)
    async with serving(app) as url:
        code = _example_code()
        for old, new in (
            ("http://127.0.0.1:8080", url),
            ('"./data"', repr(str(tmp_path / "data"))),
            ("dio.Registry()", "dio.Registry(clock=clock)"),
            ("\nanyio.run(main)", "\n"),
        ):
            assert old in code, old
            code = code.replace(old, new)
        for run in (1, 2):
            clock = FakeClock()
            namespace: dict[str, Any] = {"__name__": "readme_example", "clock": clock, "dio": dio}
            exec(compile(code, "README.md (Example)", "exec"), namespace)
            await namespace["main"]()
            out = capsys.readouterr().out
            progress = [line for line in out.splitlines() if " bars, " in line]
            assert len(progress) >= 5, out
            assert progress[-1].endswith("bars, 0 failed"), out
            if run == 1:
                fetched = len(hits)
                assert fetched > 100
                assert clock.monotonic() <= 10, "the example's rate limit makes it take minutes"
        assert len(hits) == fetched  # the rerun is served from the store (ttl=3600)
