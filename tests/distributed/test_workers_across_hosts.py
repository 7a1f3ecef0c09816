"""Workers on simulated hosts (network namespaces), the store, upstream in a services namespace:
two hosts share a run; a host cut off from the network (link down) while it holds chunks behaves
like a paused worker: the other host takes its chunks over when their leases expire, and what the
cut-off host tries to record once it is back is fenced out (0 duplicate responses)."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from ._netns import PYTHON, SERVICES, Network, Service, Upstream

ITEMS = 160

_QUERY = textwrap.dedent(
    """
    import asyncio, json, sys
    import asyncpg

    async def main():
        conn = await asyncpg.connect(sys.argv[1])
        try:
            rows = await conn.fetch(sys.argv[2])
        except asyncpg.UndefinedTableError:
            rows = []
        finally:
            await conn.close()
        print(json.dumps([list(r) for r in rows], default=str))

    asyncio.run(main())
    """
)


def query(network: Network, url: str, sql: str) -> list[list[Any]]:
    """Run ``sql`` on the store from inside the services namespace (the only one that reaches
    the database besides the hosts)."""
    done = network.run(SERVICES, [PYTHON, "-c", _QUERY, url, sql], timeout=30)
    assert done.returncode == 0, done.stderr
    rows: list[list[Any]] = json.loads(done.stdout)
    return rows


def count(network: Network, url: str, sql: str) -> int:
    """A ``count(*)`` query's answer (0 before the worker created the tables)."""
    rows = query(network, url, sql)
    return int(rows[0][0]) if rows else 0


def write_job(
    path: Path, upstream: Upstream, *, delay: float, lease_ttl: float, timeout: float = 5
) -> Path:
    data = {
        "job": "hosts",
        "sources": {
            "api": {
                "adapter": "http",
                "base_url": upstream.url,
                "timeout": timeout,
                "retry": {"max_attempts": 1},
            }
        },
        "requests": [
            {
                "source": "api",
                "kind": "item",
                "endpoint": "/items/{n}",
                "params": {"delay": str(delay)},
                "expand": {"n": list(range(ITEMS))},
            }
        ],
        "concurrency": 8,
        "lease_ttl": lease_ttl,
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_worker(network: Network, host: str, job: Path, store: str) -> subprocess.Popen[str]:
    payloads = job.parent / "payloads"  # these hosts share a filesystem
    return network.python(
        host,
        "-m",
        "mxm_dataio_async",
        "worker",
        str(job),
        "--store",
        store,
        "--payloads",
        str(payloads),
        "--chunk-size",
        "8",
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    summary: dict[str, Any] = json.loads(out)
    return summary


def assert_exactly_once(network: Network, store: str, upstream: Upstream) -> None:
    done = query(network, store, "SELECT idx, count(*) FROM job_done GROUP BY idx ORDER BY idx")
    assert [d[0] for d in done] == list(range(ITEMS)) and {d[1] for d in done} == {1}
    duplicates = query(
        network,
        store,
        "SELECT request_hash, count(*) FROM responses WHERE status = 'ok' "
        "GROUP BY request_hash HAVING count(*) > 1",
    )
    assert duplicates == []
    assert query(network, store, "SELECT count(*) FROM responses WHERE status = 'ok'") == [[ITEMS]]
    assert len(upstream.hits()) == ITEMS


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_hosts_share_a_run(
    network: Network, net_postgres: Service, net_upstream: Upstream, tmp_path: Path
) -> None:
    job = write_job(tmp_path / "job.yaml", net_upstream, delay=0.1, lease_ttl=2.0)
    procs = [start_worker(network, host, job, net_postgres.url) for host in ("a", "b")]
    summaries = [finish(p) for p in procs]
    assert all(s["complete"] for s in summaries)
    assert all(s["chunks_done"] > 0 for s in summaries)  # both hosts did work
    assert sum(s["fetched"] for s in summaries) == ITEMS
    assert_exactly_once(network, net_postgres.url, net_upstream)
    assert set(net_upstream.hits().values()) == {1}
    hosts = query(network, net_postgres.url, "SELECT DISTINCT host FROM job_workers")
    assert len(hosts) == 1  # one machine's hostname: the namespaces share it (not their address)


def test_a_partitioned_host_is_fenced_out_like_a_paused_worker(
    network: Network, net_postgres: Service, net_upstream: Upstream, tmp_path: Path
) -> None:
    store = net_postgres.url
    # Requests wait out the partition (timeout 30 s) and get their answers after it heals, when
    # the cut-off host's leases (1.5 s) have long expired and the other host has recorded them.
    job = write_job(tmp_path / "job.yaml", net_upstream, delay=0.2, lease_ttl=1.5, timeout=30)
    cut = start_worker(network, "a", job, store)
    done = "SELECT count(*) FROM job_done"
    wait_for(lambda: count(network, store, done) >= 16, 60, "the first host's work")
    seen = len(net_upstream.hits())
    wait_for(lambda: len(net_upstream.hits()) >= seen + 8, 30, "requests in flight")
    network.partition("a")  # requests in flight, chunks held: cut off
    try:
        other = start_worker(network, "b", job, store)
        summary_other = finish(other)  # takes the cut-off host's chunks once they expire
    finally:
        network.heal("a")
    summary_cut = finish(cut)
    assert summary_other["complete"] and summary_cut["complete"]
    assert summary_cut["chunks_lost"] >= 1  # what it answered late was not recorded
    assert_exactly_once(network, store, net_upstream)
