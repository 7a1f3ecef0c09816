"""Shared helpers for the reliability tests: the fault ledger and isolated runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread
import pytest

REPO = Path(__file__).resolve().parents[2]

ReportFaults = Callable[[str, Mapping[str, int]], Path]


@pytest.fixture(scope="session")
def fault_ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Counter[str]]]:
    """Faults injected (and survived) per test, written to one JSON file at the end of the run."""
    ledger: dict[str, Counter[str]] = {}
    yield ledger
    if not ledger:
        return
    total: Counter[str] = Counter()
    for counts in ledger.values():
        total.update(counts)
    path = tmp_path_factory.getbasetemp() / "reliability-faults.json"
    doc = {"total": dict(sorted(total.items())), "by_test": {k: dict(v) for k, v in ledger.items()}}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    faults = sum(v for k, v in total.items() if k != "ok")
    print(f"\n{faults} faults injected and survived, all tests: {dict(sorted(total.items()))}")
    print(f"fault ledger: {path}")


@pytest.fixture
def report_faults(fault_ledger: dict[str, Counter[str]], tmp_path: Path) -> ReportFaults:
    """``report_faults(name, counts)``: print them, add them to the ledger, write tmp JSON."""

    def report(name: str, counts: Mapping[str, int]) -> Path:
        kept = Counter({k: v for k, v in counts.items() if v})
        fault_ledger.setdefault(name, Counter()).update(kept)
        path = tmp_path / "faults.json"
        path.write_text(json.dumps(dict(sorted(kept.items())), indent=2))
        total = sum(v for k, v in kept.items() if k != "ok")
        print(f"\n{name}: {total} faults injected and survived: {dict(sorted(kept.items()))}")
        print(f"{name}: written to {path}")
        return path

    return report


@dataclass(frozen=True)
class Isolated:
    timed_out: bool
    returncode: int | None
    stdout: str
    stderr: str


def _run_all(
    script: Path, variants: Sequence[str], workdir: Path, timeout: float
) -> dict[str, Isolated]:
    procs = {
        variant: subprocess.Popen(
            [sys.executable, str(script), str(workdir / variant), variant],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for variant in variants
    }
    deadline = time.monotonic() + timeout
    results: dict[str, Isolated] = {}
    for variant, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results[variant] = Isolated(True, None, out, err)
        else:
            results[variant] = Isolated(False, proc.returncode, out, err)
    return results


RunIsolated = Callable[[str, Sequence[str], float], Awaitable[dict[str, Isolated]]]


@pytest.fixture
def run_isolated(tmp_path: Path) -> RunIsolated:
    """``await run_isolated(script, variants, seconds)``: run ``script`` once per variant, in
    parallel child processes (argv: a fresh directory, the variant), killed after ``seconds``.

    For scenarios that can hang inside shielded code: the test stays bounded whatever happens.
    """

    async def run(script: str, variants: Sequence[str], seconds: float) -> dict[str, Isolated]:
        path = tmp_path / "isolated.py"
        path.write_text(script)
        return await anyio.to_thread.run_sync(_run_all, path, variants, tmp_path, seconds)

    return run
