"""The README's example records against a loopback upstream and replays with it stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.plugin.conftest import Upstream

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Testing with recorded interactions") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def test_the_readme_example_records_and_replays(inner: pytest.Pytester, upstream: Upstream) -> None:
    code = readme_example().replace("https://api.example.com", upstream.url)
    code += """

class Quote:
    def __init__(self, symbol):
        self.symbol = symbol

def parse_quote(body):
    import json
    return Quote(json.loads(body)["symbol"])
"""
    inner.makepyfile(test_example=code)
    inner.runpytest().assert_outcomes(failed=1)  # not recorded yet
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=1)
    upstream.stop()
    inner.runpytest().assert_outcomes(passed=1)
    assert upstream.hits == {"/quote": 1}
