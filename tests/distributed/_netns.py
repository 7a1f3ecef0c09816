"""Several hosts on one machine: Linux network namespaces joined by a bridge (root only).

A :class:`Network` makes a *services* namespace holding a bridge (``br0``, at ``10.213.X.1`` on a
/24 with a random ``X``) and one namespace per simulated host, each with a veth pair whose host end
is ``eth0`` (``10.213.X.11``, ``.12``, ...) and whose other end (``v-<host>``) is a port of the
bridge. The /24 exists only inside these namespaces: nothing is routed to or from the machine's
own network, and a namespace cannot reach another's ``127.0.0.1``, so services bind the services
address. Every interface is created directly inside its namespace, so no name is ever taken in the
root namespace and deleting the namespaces deletes every link.

``partition(host)`` sets the bridge end of the host's veth down: the host's ``eth0`` loses its
carrier and packets both ways are dropped silently (a pulled cable). New connections time out,
established ones stall and carry on after ``heal(host)``: from the services' side the host just
goes quiet, as a SIGSTOPped worker does.

Names carry the creating process's pid (``mxmt<pid>x<random>-svc``, ``...-<host>``): a network
left behind by a crashed run is swept (its processes killed, its namespaces and temporary
directories deleted) by the next run, once its creator is gone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PREFIX = "mxmt"
SERVICES = "services"
"""The name of the services namespace in every method that takes a host."""

PYTHON = sys.executable
IP = shutil.which("ip") or "ip"
HERE = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = HERE / "_upstream.py"
PROBE_SCRIPT = HERE / "_probe.py"

_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,9}\Z")
_LEFTOVER = re.compile(rf"{PREFIX}(\d+)x[0-9a-f]+-")
_FIRST_HOST_OCTET = 11
_MAX_HOSTS = 200
_FIRST_PORT = 20000
_PG_ROLE = "dataio"
_PG_PASSWORD = "dataio"

_WAIT_PORT = """\
import socket, sys, time
address, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((address, port), timeout=0.2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.005)
"""


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no ``ip``, no CAP_SYS_ADMIN, ...)."""


class ServiceUnavailable(RuntimeError):
    """A service's program is not installed (``redis-server``, PostgreSQL's binaries)."""


class IpError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its stderr."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here before trying (None: try); creation can still fail."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which(IP) is None:
        return "the ip command is missing (apt-get install iproute2)"
    return None


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        [IP, *args], input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        raise IpError(f"ip {' '.join(args)}: {detail}")
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    """The processes in a namespace (``ip netns pids``); empty if it does not exist."""
    return [int(p) for p in _ip("netns", "pids", namespace, check=False).split()]


def _kill_namespace(namespace: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in the namespace until none is left; returns those still there."""
    deadline = time.monotonic() + timeout
    while True:
        pids = namespace_pids(namespace)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list``)."""
    return [line.split()[0] for line in _ip("netns", "list", check=False).splitlines() if line]


def sweep_leftovers() -> list[str]:
    """Delete namespaces and temporary directories of networks whose creating process is gone.

    Best effort: returns the namespaces deleted. Networks of live processes are left alone, so
    concurrent runs (pytest-xdist, another checkout) do not break each other.
    """
    swept: list[str] = []
    for name in namespaces():
        match = _LEFTOVER.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        _kill_namespace(name)
        with contextlib.suppress(IpError):
            _ip("netns", "del", name)
            swept.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*x*-*"):
        match = _LEFTOVER.match(path.name)
        if match is not None and not _alive(int(match.group(1))) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    return swept


_swept = False


def _sweep_once() -> None:
    global _swept
    if not _swept:
        _swept = True
        sweep_leftovers()


def _run_id() -> str:
    return f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"


def _make_workdir(run_id: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{run_id}-"))
    path.chmod(0o755)  # the postgres user must traverse it
    return path


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _signal_process(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    """Signal the process's group if it leads one (``start_new_session``), else the process.

    A stopped process gets SIGCONT too, or a SIGTERM would wait for someone to continue it.
    """
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
            if sig != signal.SIGKILL:
                os.killpg(proc.pid, signal.SIGCONT)
        else:
            os.kill(proc.pid, sig)
            if sig != signal.SIGKILL:
                os.kill(proc.pid, signal.SIGCONT)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 2.0) -> None:
    """SIGTERM (and SIGCONT) each, wait up to ``grace`` seconds in all, then SIGKILL; reaps all."""
    for proc in procs:
        _signal_process(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_process(proc, signal.SIGKILL)
            proc.wait()


def postgres_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin``; :class:`ServiceUnavailable` if none."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise ServiceUnavailable(
            "PostgreSQL is not installed: no /usr/lib/postgresql/*/bin (apt-get install postgresql)"
        )
    return found[-1].parent


def _as_postgres(*argv: str | Path) -> list[str]:
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServiceUnavailable("runuser is missing: PostgreSQL must run as the postgres user")
    return [runuser, "-u", "postgres", "--", *map(str, argv)]


def _checked(argv: Sequence[str], what: str, timeout: float = 60.0) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stderr or proc.stdout}")


class PostgresTemplate:
    """A cluster made by ``initdb`` once (about 1 s), copied for each server (a few ms).

    Role ``dataio`` with password ``dataio``, scram-sha-256. The directory is created lazily on
    the first :meth:`copy_to` and deleted by :meth:`close`.
    """

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._data: Path | None = None

    def data(self) -> Path:
        if self._data is None:
            bin_dir = postgres_bin()
            self._dir = _make_workdir(f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}")
            data = self._dir / "data"
            password = self._dir / "password"
            password.write_text(_PG_PASSWORD + "\n")
            data.mkdir()
            shutil.chown(data, "postgres")
            shutil.chown(password, "postgres")
            _checked(
                _as_postgres(
                    bin_dir / "initdb",
                    "-D",
                    data,
                    "-U",
                    _PG_ROLE,
                    f"--pwfile={password}",
                    "-A",
                    "scram-sha-256",
                    "--no-sync",
                ),
                "initdb",
            )
            self._data = data
        return self._data

    def copy_to(self, dest: Path) -> None:
        """Copy the cluster to ``dest`` (which must not exist), owner and modes kept."""
        _checked(["cp", "-a", str(self.data()), str(dest)], "copying the PostgreSQL template")

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = self._data = None

    def __enter__(self) -> PostgresTemplate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Host:
    """A simulated host: its namespace, its address, its interface and the bridge's port to it."""

    def __init__(self, name: str, namespace: str, address: str, peer: str) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self.interface = "eth0"
        self.peer = peer  # the bridge end, in the services namespace

    def __repr__(self) -> str:
        return f"Host({self.name!r}, namespace={self.namespace!r}, address={self.address!r})"


class Service:
    """A server started by a :class:`Network`, bound to ``address:port`` in ``host``'s namespace.

    ``url`` is how clients in the host namespaces reach it. ``stop()`` and ``start()`` take it
    down and bring it back (same address and port; Redis comes back empty, PostgreSQL with its
    data): a service going away mid-run. The network stops it on exit.
    """

    def __init__(
        self,
        name: str,
        host: str,
        address: str,
        port: int,
        url: str,
        log: Path,
        start: Callable[[], subprocess.Popen[bytes] | None],
        stop: Callable[[Service, bool], None],
    ) -> None:
        self.name = name
        self.host = host
        self.address = address
        self.port = port
        self.url = url
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.running = False
        self._start = start
        self._stop = stop

    def start(self) -> None:
        if not self.running:
            self.process = self._start()
            self.running = True

    def stop(self, *, quick: bool = False) -> None:
        """Stop it (``quick``: as fast as possible, PostgreSQL in immediate mode)."""
        if self.running:
            self.running = False
            self._stop(self, quick)

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log, lines)

    def __repr__(self) -> str:
        return f"Service({self.name!r}, url={self.url!r}, running={self.running})"


class Upstream(Service):
    """The counting HTTP server (``_upstream.py``): any path answers 200 with JSON.

    ``?status=N`` answers N, ``?delay=S`` waits S seconds first. Every request is recorded (path
    and query, on arrival) in a file shared with the test: :meth:`hits`.
    """

    def __init__(
        self,
        name: str,
        host: str,
        address: str,
        port: int,
        url: str,
        log: Path,
        start: Callable[[], subprocess.Popen[bytes] | None],
        stop: Callable[[Service, bool], None],
        hits_file: Path,
    ) -> None:
        super().__init__(name, host, address, port, url, log, start, stop)
        self.hits_file = hits_file

    def hits(self) -> Counter[str]:
        """Requests received so far, by path and query (``/a/b?x=1``)."""
        try:
            text = self.hits_file.read_text()
        except FileNotFoundError:
            return Counter()
        return Counter(line for line in text.splitlines() if line)

    @property
    def total(self) -> int:
        return sum(self.hits().values())


class Network:
    """A services namespace with a bridge and one namespace per simulated host (see module doc).

    ``hosts`` is a count (hosts ``h1``..``hN``) or names (``("a", "b")``: lowercase, up to 10
    characters). Use it as a context manager: on exit every process and service it started is
    stopped, every process left in its namespaces is killed, and the namespaces (so every link)
    and its temporary directory are deleted, also when the body failed. Setup raises
    :class:`NamespacesUnavailable` when namespaces cannot be created here.
    """

    def __init__(
        self,
        hosts: int | Sequence[str] = 2,
        *,
        postgres_template: PostgresTemplate | None = None,
    ) -> None:
        names = [f"h{i}" for i in range(1, hosts + 1)] if isinstance(hosts, int) else list(hosts)
        if not names or len(names) > _MAX_HOSTS:
            raise ValueError(f"between 1 and {_MAX_HOSTS} hosts, not {len(names)}")
        for name in names:
            if not _HOST_NAME.match(name) or name in (SERVICES, "svc"):
                raise ValueError(f"host name {name!r}: lowercase letters and digits, 1-10, not svc")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names: {names}")
        self.run_id = _run_id()
        octet = 16 + secrets.randbelow(224)
        self.subnet = f"10.213.{octet}.0/24"
        self.services_address = f"10.213.{octet}.1"
        self.services_namespace = f"{self.run_id}-svc"
        self.hosts: dict[str, Host] = {
            name: Host(
                name,
                f"{self.run_id}-{name}",
                f"10.213.{octet}.{_FIRST_HOST_OCTET + i}",
                f"v-{name}",
            )
            for i, name in enumerate(names)
        }
        self.workdir: Path | None = None
        self.setup_seconds = 0.0
        self.teardown_seconds = 0.0
        self.partitioned: set[str] = set()
        self._postgres_template = postgres_template
        self._created: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._services: list[Service] = []
        self._ports = itertools.count(_FIRST_PORT)
        self._counter = itertools.count(1)
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Network:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=exc is None)

    def open(self) -> Network:
        reason = unavailable_reason()
        if reason is not None:
            raise NamespacesUnavailable(reason)
        _sweep_once()
        started = time.monotonic()
        try:
            self.workdir = _make_workdir(self.run_id)
            self._create()
        except BaseException:
            self.close(raise_errors=False)
            raise
        self.setup_seconds = time.monotonic() - started
        return self

    def _create(self) -> None:
        svc = self.services_namespace
        try:
            _ip("netns", "add", svc)
        except IpError as e:
            raise NamespacesUnavailable(f"cannot create a network namespace: {e}") from e
        self._created.append(svc)
        try:
            for host in self.hosts.values():
                _ip("netns", "add", host.namespace)
                self._created.append(host.namespace)
            prefix = self.subnet.split("/")[1]
            commands = [
                "link set lo up",
                "link add br0 type bridge forward_delay 0",
                f"addr add {self.services_address}/{prefix} dev br0",
                "link set br0 up",
            ]
            for host in self.hosts.values():
                commands += [
                    f"link add {host.peer} type veth peer name {host.interface}"
                    f" netns {host.namespace}",
                    f"link set {host.peer} master br0",
                    f"link set {host.peer} up",
                ]
            _ip("-n", svc, "-batch", "-", stdin="\n".join(commands) + "\n")
            for host in self.hosts.values():
                host_commands = [
                    "link set lo up",
                    f"addr add {host.address}/{prefix} dev {host.interface}",
                    f"link set {host.interface} up",
                ]
                _ip("-n", host.namespace, "-batch", "-", stdin="\n".join(host_commands) + "\n")
        except IpError as e:
            raise NamespacesUnavailable(f"cannot build the simulated network: {e}") from e

    def close(self, *, raise_errors: bool = True) -> None:
        """Stop everything, delete the namespaces and the temporary directory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        errors: list[str] = []
        for service in reversed(self._services):
            # A service a test killed cannot be stopped cleanly; whatever is left of it is
            # killed with the rest of its namespace below.
            with contextlib.suppress(Exception):
                service.stop(quick=True)
        stop_processes(self._processes)
        for proc in self._processes:
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        for namespace in reversed(self._created):
            left = _kill_namespace(namespace)
            if left:
                errors.append(f"processes {left} would not leave {namespace}")
            try:
                _ip("netns", "del", namespace)
            except IpError as e:
                errors.append(str(e))
        self._created.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.teardown_seconds = time.monotonic() - started
        if errors and raise_errors:
            raise RuntimeError("network cleanup: " + "; ".join(errors))

    # -- addressing ------------------------------------------------------------------------

    def host(self, host: str) -> Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} (hosts: {', '.join(self.hosts)})") from None

    def namespace(self, host: str) -> str:
        """The namespace's name (``ip netns exec NAME``); ``SERVICES`` for the services one."""
        return self.services_namespace if host == SERVICES else self.host(host).namespace

    def address(self, host: str) -> str:
        return self.services_address if host == SERVICES else self.host(host).address

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise RuntimeError("the network is not open")
        return self.workdir / name

    # -- processes -------------------------------------------------------------------------

    def popen(
        self, host: str, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """``subprocess.Popen(argv, **kwargs)`` inside ``host``'s namespace (``ip netns exec``).

        The pid is the program's own (``ip netns exec`` execs it). The environment is inherited
        unless ``env=`` is given (subprocess semantics). ``start_new_session`` defaults to True,
        so the program and its children are one process group for signals (SIGSTOP the pid, or
        ``os.killpg``). The network stops it on exit (SIGTERM+SIGCONT, then SIGKILL after 2 s)
        and closes its pipes.
        """
        if self._closed or self.workdir is None:
            raise RuntimeError("the network is not open")
        kwargs.setdefault("start_new_session", True)
        command = [IP, "netns", "exec", self.namespace(host), *(os.fspath(a) for a in argv)]
        proc: subprocess.Popen[Any] = subprocess.Popen(command, **kwargs)
        self._processes.append(proc)
        return proc

    def run(
        self,
        host: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run to completion in ``host``'s namespace; stdout and stderr captured as text."""
        proc = self.popen(
            host,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_process(proc, signal.SIGKILL)
            proc.communicate()
            raise
        self._processes.remove(proc)  # done and reaped: nothing left to stop
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def python(
        self, host: str, *args: str | os.PathLike[str], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """``popen(host, [sys.executable, *args], **kwargs)``: this venv's Python."""
        return self.popen(host, [PYTHON, *args], **kwargs)

    # -- partitions ------------------------------------------------------------------------

    def partition(self, host: str) -> None:
        """Cut ``host`` off: the bridge end of its link down, packets both ways dropped silently."""
        _ip("-n", self.services_namespace, "link", "set", self.host(host).peer, "down")
        self.partitioned.add(host)

    def heal(self, host: str) -> None:
        """Bring ``host``'s link back up; stalled connections carry on (TCP retransmits)."""
        h = self.host(host)
        _ip("-n", self.services_namespace, "link", "set", h.peer, "up")
        # Forget the neighbours that went unanswered while cut off: the next packet resolves
        # them at once, rather than at the next ARP retry (up to 1 s later).
        _ip("-n", h.namespace, "neigh", "flush", "dev", h.interface, check=False)
        _ip("-n", self.services_namespace, "neigh", "flush", "to", h.address, check=False)
        self.partitioned.discard(host)

    @contextlib.contextmanager
    def partitioned_host(self, host: str) -> Iterator[None]:
        """``partition(host)`` for the block, ``heal(host)`` after."""
        self.partition(host)
        try:
            yield
        finally:
            self.heal(host)

    # -- services --------------------------------------------------------------------------

    def free_port(self) -> int:
        """A port for a new service: every namespace here is new, so a counter is enough."""
        return next(self._ports)

    def wait_port(
        self,
        host: str,
        address: str,
        port: int,
        *,
        timeout: float = 10.0,
        process: subprocess.Popen[Any] | None = None,
        log: Path | None = None,
    ) -> None:
        """Poll until ``address:port`` accepts a TCP connection from inside ``host``.

        Fails early if ``process`` (the server) exits first, with its log's tail.
        """
        poller = self.popen(
            host,
            [PYTHON, "-I", "-S", "-c", _WAIT_PORT, address, str(port), str(timeout)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while poller.poll() is None:
            if process is not None and process.poll() is not None:
                _signal_process(poller, signal.SIGKILL)
                poller.wait()
                tail = _tail(log) if log is not None else ""
                raise RuntimeError(
                    f"{process.args!r} exited ({process.returncode}) before {address}:{port}"
                    f" answered:\n{tail}"
                )
            time.sleep(0.005)
        if poller.returncode != 0:
            tail = _tail(log) if log is not None else ""
            raise TimeoutError(
                f"{address}:{port} not accepting in {host} after {timeout} s\n{tail}"
            )

    def start_service(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        port: int,
        host: str = SERVICES,
        url: str | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 10.0,
    ) -> Service:
        """Start a foreground server in ``host``'s namespace, its output to a log file, and wait
        until ``address(host):port`` accepts connections. ``url`` defaults to ``tcp://addr:port``.
        """
        address = self.address(host)
        log = self._path(f"{name}-{next(self._counter)}.log")
        start, stop = self._foreground(host, argv, port, log, env, ready_timeout)
        url = url or f"tcp://{address}:{port}"
        return self._started(Service(name, host, address, port, url, log, start, stop))

    def _started(self, service: Service) -> Service:
        service.start()
        self._services.append(service)
        return service

    def _foreground(
        self,
        host: str,
        argv: Sequence[str | os.PathLike[str]],
        port: int,
        log: Path,
        env: dict[str, str] | None,
        ready_timeout: float,
    ) -> tuple[Callable[[], subprocess.Popen[bytes]], Callable[[Service, bool], None]]:
        address = self.address(host)

        def start() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:
                proc: subprocess.Popen[bytes] = self.popen(
                    host,
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            try:
                self.wait_port(host, address, port, timeout=ready_timeout, process=proc, log=log)
            except BaseException:
                stop_processes([proc], grace=0.5)
                raise
            return proc

        def stop(service: Service, quick: bool) -> None:
            if service.process is not None:
                stop_processes([service.process], grace=0.5 if quick else 5.0)

        return start, stop

    def start_python(
        self,
        name: str,
        args: Sequence[str | os.PathLike[str]],
        *,
        port: int,
        host: str = SERVICES,
        url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Service:
        """:meth:`start_service` for ``[sys.executable, *args]`` (a script and its arguments, or
        ``-c SOURCE ...``); the program must listen on ``address(host):port``."""
        return self.start_service(name, [PYTHON, *args], port=port, host=host, url=url, env=env)

    def start_redis(self, *, port: int | None = None, args: Sequence[str] = ()) -> Service:
        """Redis in the services namespace: no persistence, protected mode off (the network
        exists only in these namespaces). ``url`` is ``redis://10.213.X.1:P/0``."""
        redis = shutil.which("redis-server")
        if redis is None:
            raise ServiceUnavailable("redis-server is not installed (apt-get install redis-server)")
        port = port or self.free_port()
        address = self.services_address
        data = self._path(f"redis-{port}")
        data.mkdir(exist_ok=True)
        argv = [
            redis,
            "--bind",
            address,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            str(data),
            "--daemonize",
            "no",
            *args,
        ]
        return self.start_service("redis", argv, port=port, url=f"redis://{address}:{port}/0")

    def start_postgres(self, *, port: int | None = None) -> Service:
        """PostgreSQL in the services namespace, run as the ``postgres`` user, fsync off, a
        ``pg_hba`` rule for the /24 (scram-sha-256). ``url`` is
        ``postgresql://dataio:dataio@10.213.X.1:P/postgres``. Uses the network's
        :class:`PostgresTemplate` if it has one, else runs ``initdb`` (about 1 s)."""
        bin_dir = postgres_bin()
        port = port or self.free_port()
        address = self.services_address
        root = self._path(f"postgres-{port}")
        root.mkdir()
        data = root / "data"
        if self._postgres_template is not None:
            self._postgres_template.copy_to(data)
        else:
            with PostgresTemplate() as template:
                template.copy_to(data)
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {self.subnet} scram-sha-256\n")
        shutil.chown(root, "postgres")
        log = root / "log"
        log.touch()
        shutil.chown(log, "postgres")
        options = (
            f"-c listen_addresses={address} -p {port} -k {root} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]

        def start() -> None:
            argv = [IP, "netns", "exec", self.services_namespace]
            argv += _as_postgres(*ctl, "-l", str(log), "-w", "-t", "60", "-o", options, "start")
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"pg_ctl start failed: {proc.stderr}\n{_tail(log)}")

        def stop(service: Service, quick: bool) -> None:
            mode = "immediate" if quick else "fast"
            _checked(_as_postgres(*ctl, "-m", mode, "-w", "-t", "60", "stop"), "pg_ctl stop")

        url = f"postgresql://{_PG_ROLE}:{_PG_PASSWORD}@{address}:{port}/postgres"
        return self._started(Service("postgres", SERVICES, address, port, url, log, start, stop))

    def start_upstream(self, *, port: int | None = None, host: str = SERVICES) -> Upstream:
        """The counting HTTP server (``_upstream.py``, aiohttp) at ``http://addr:port``."""
        port = port or self.free_port()
        address = self.address(host)
        hits = self._path(f"upstream-{port}.hits")
        log = self._path(f"upstream-{next(self._counter)}.log")
        argv: list[str | os.PathLike[str]] = [
            PYTHON,
            UPSTREAM_SCRIPT,
            "--address",
            address,
            "--port",
            str(port),
            "--hits",
            hits,
        ]
        start, stop = self._foreground(host, argv, port, log, None, 10.0)
        url = f"http://{address}:{port}"
        upstream = Upstream("upstream", host, address, port, url, log, start, stop, hits)
        self._started(upstream)
        return upstream
