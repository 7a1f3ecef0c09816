"""The simulated-hosts harness itself, with real processes: clients in host namespaces reach Redis,
PostgreSQL and an HTTP upstream in the services namespace and nothing else; a partition cuts one
host off silently until it is healed; cleanup leaves no namespace, link, process or directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from ._netns import (
    PREFIX,
    PROBE_SCRIPT,
    PYTHON,
    Network,
    Service,
    Upstream,
    namespace_pids,
    namespaces,
    sweep_leftovers,
)
from .conftest import MakeNetwork

OK = "ok"


def probe(network: Network, host: str, *urls: str, timeout: float = 0.5) -> dict[str, str]:
    """Each URL's outcome seen from ``host`` (``_probe.py``: all at once, ``timeout`` each)."""
    argv: list[str | os.PathLike[str]] = [PYTHON, PROBE_SCRIPT, "--timeout", str(timeout), *urls]
    result = network.run(host, argv, timeout=30)
    assert result.returncode == 0, result.stderr
    outcome: dict[str, str] = json.loads(result.stdout)
    return outcome


def probe_until_ok(network: Network, host: str, *urls: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        outcome = probe(network, host, *urls)
        if all(v == OK for v in outcome.values()):
            return
        assert time.monotonic() < deadline, outcome
        time.sleep(0.05)


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_hosts_reach_the_services(
    network: Network, net_redis: Service, net_postgres: Service, net_upstream: Upstream
) -> None:
    assert net_redis.url == f"redis://{network.services_address}:{net_redis.port}/0"
    assert net_postgres.url.startswith(f"postgresql://dataio:dataio@{network.services_address}:")
    for host in ("a", "b"):
        urls = (net_redis.url, net_postgres.url, f"{net_upstream.url}/from/{host}?n=1")
        assert probe(network, host, *urls) == dict.fromkeys(urls, OK)
    assert net_upstream.hits() == Counter({"/from/a?n=1": 1, "/from/b?n=1": 1})
    # Host-to-host works too: a server on b, bound to b's address, reached from a.
    server = network.start_python(
        "listener",
        ["-c", _LISTEN, network.address("b"), "7000"],
        port=7000,
        host="b",
    )
    assert probe(network, "a", server.url) == {server.url: OK}


def test_services_go_away_and_come_back(
    network: Network, net_redis: Service, net_postgres: Service
) -> None:
    urls = (net_redis.url, net_postgres.url)
    net_redis.stop()
    net_postgres.stop()
    assert not net_redis.running and not net_postgres.running
    outcome = probe(network, "a", *urls)
    assert all(v.startswith("ConnectionRefusedError") for v in outcome.values()), outcome
    net_redis.start()
    net_postgres.start()
    assert probe(network, "a", *urls) == dict.fromkeys(urls, OK)


_LISTEN = """\
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    s.accept()[0].close()
"""


def test_hosts_are_isolated_from_the_machine(network: Network, net_redis: Service) -> None:
    # A service on the root namespace's loopback (and on all its addresses) is not reachable
    # from a host namespace: its 127.0.0.1 is its own, and it has no route off the /24.
    with (
        socket.create_server(("127.0.0.1", 0)) as loopback,
        socket.create_server(("", 0)) as anyaddr,
    ):
        loop_url = f"tcp://127.0.0.1:{loopback.getsockname()[1]}"
        any_url = f"tcp://127.0.0.1:{anyaddr.getsockname()[1]}"
        svc_loop = f"tcp://127.0.0.1:{net_redis.port}"  # the services namespace's loopback
        outcome = probe(network, "a", loop_url, any_url, svc_loop, net_redis.url)
    assert outcome[net_redis.url] == OK
    for url in (loop_url, any_url, svc_loop):
        assert outcome[url].startswith("ConnectionRefusedError"), outcome
    for host in ("a", "b"):
        routes = network.run(host, ["ip", "route", "show"], check=True).stdout.splitlines()
        assert [r.split()[0] for r in routes] == [network.subnet], routes  # no default route


def _ask(hold: subprocess.Popen[str]) -> str:
    assert hold.stdin is not None and hold.stdout is not None
    hold.stdin.write("ping\n")
    hold.stdin.flush()
    return hold.stdout.readline().strip()


def test_a_partition_cuts_one_host_off_silently_until_healed(
    network: Network, net_redis: Service, net_postgres: Service, net_upstream: Upstream
) -> None:
    urls = (net_redis.url, net_postgres.url)
    # One long-lived Redis connection from a, which never reconnects.
    hold: subprocess.Popen[str] = network.python(
        "a",
        PROBE_SCRIPT,
        "--timeout",
        "0.3",
        "hold",
        net_redis.url,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hold.stdout is not None
    assert hold.stdout.readline().strip() == "connected"
    assert _ask(hold) == OK

    network.partition("a")
    assert network.partitioned == {"a"}
    started = time.monotonic()
    outcome = probe(network, "a", *urls, f"{net_upstream.url}/a-cut", timeout=0.5)
    # Dropped silently (timeouts, not refusals): what a worker sees when its link is gone.
    assert set(outcome.values()) == {"timeout"}, outcome
    assert time.monotonic() - started < 3.0
    assert probe(network, "b", *urls, f"{net_upstream.url}/b-meanwhile") == dict.fromkeys(
        (*urls, f"{net_upstream.url}/b-meanwhile"), OK
    )
    assert _ask(hold) == "timeout"  # the established connection stalls: no RST, no EOF

    network.heal("a")
    assert network.partitioned == set()
    deadline = time.monotonic() + 10.0
    healed = time.monotonic()
    while (answer := _ask(hold)) != OK:
        assert answer == "timeout", answer
        assert time.monotonic() < deadline, "the held connection did not recover"
    print(f"held connection back {time.monotonic() - healed:.2f} s after heal")
    probe_until_ok(network, "a", *urls, f"{net_upstream.url}/a-healed")
    assert net_upstream.hits()["/a-cut"] == 0
    assert net_upstream.hits()["/b-meanwhile"] == 1
    assert net_upstream.hits()["/a-healed"] >= 1

    with network.partitioned_host("b"):
        assert probe(network, "b", net_redis.url, timeout=0.3) == {net_redis.url: "timeout"}
        assert probe(network, "a", net_redis.url) == {net_redis.url: OK}
    probe_until_ok(network, "b", net_redis.url)

    assert hold.stdin is not None
    hold.stdin.close()
    assert hold.wait(timeout=5) == 0
    hold.stdout.close()


def test_cleanup_leaves_nothing_behind(make_network: MakeNetwork) -> None:
    links_before = root_links()
    network = make_network(3)
    assert list(network.hosts) == ["h1", "h2", "h3"]
    assert [h.address for h in network.hosts.values()] == [
        network.subnet.replace(".0/24", f".{n}") for n in (11, 12, 13)
    ]
    created = [network.services_namespace, *(h.namespace for h in network.hosts.values())]
    assert set(created) <= set(namespaces())
    workdir = network.workdir
    assert workdir is not None and workdir.is_dir()

    redis = network.start_redis()
    postgres = network.start_postgres()
    postmaster = int(
        (workdir / f"postgres-{postgres.port}" / "data" / "postmaster.pid").read_text().split()[0]
    )
    sleeper = network.popen("h1", ["sleep", "60"])
    stopped = network.popen("h2", ["sleep", "60"])
    os.kill(stopped.pid, signal.SIGSTOP)
    # A child that outlives its parent, and a process the harness did not start: both are found
    # in the namespace and killed.
    orphaner = network.popen("h3", ["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE)
    assert orphaner.stdout is not None
    orphan = int(orphaner.stdout.readline())
    orphaner.stdout.close()
    assert orphaner.wait(timeout=5) == 0
    stray = subprocess.Popen(["ip", "netns", "exec", network.namespace("h3"), "sleep", "60"])
    deadline = time.monotonic() + 5
    while stray.pid not in namespace_pids(network.namespace("h3")):
        assert time.monotonic() < deadline

    network.close()
    assert stray.wait(timeout=5) == -signal.SIGKILL
    print(f"setup {network.setup_seconds:.3f} s, teardown {network.teardown_seconds:.3f} s")
    assert network.teardown_seconds < 5.0
    assert not set(created) & set(namespaces())
    assert not workdir.exists()
    new_links = root_links() - links_before
    assert not {n for n in new_links if n == "br0" or n.startswith("v-")}, new_links
    assert redis.process is not None and redis.process.returncode is not None
    assert sleeper.returncode is not None and stopped.returncode is not None
    for pid in (postmaster, orphan):
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), pid
    network.close()  # idempotent


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_leftovers_of_a_crashed_run_are_swept(make_network: MakeNetwork) -> None:
    make_network(1)  # skips where namespaces cannot be created
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, live = f"{PREFIX}{gone.pid}x0000aa", f"{PREFIX}{os.getpid()}x0000bb"
    tmp = Path("/tmp") / f"{dead}-leftover"
    tmp.mkdir()
    for name in (f"{dead}-svc", f"{live}-svc"):
        subprocess.run(["ip", "netns", "add", name], check=True)
    inside = subprocess.Popen(["ip", "netns", "exec", f"{dead}-svc", "sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while inside.pid not in namespace_pids(f"{dead}-svc"):
            assert time.monotonic() < deadline
        assert sweep_leftovers() == [f"{dead}-svc"]
        assert inside.wait(timeout=5) == -signal.SIGKILL
        assert f"{dead}-svc" not in namespaces()
        assert f"{live}-svc" in namespaces()  # its creator (this process) is alive
        assert not tmp.exists()
    finally:
        if inside.poll() is None:
            inside.kill()
            inside.wait()
        for name in (f"{dead}-svc", f"{live}-svc"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        if tmp.exists():
            tmp.rmdir()


@pytest.mark.parametrize("bad", ["A", "svc", "services", "a-b", "abcdefghijk"])
def test_host_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        Network((bad,))
