# SPDX-License-Identifier: MIT
"""Security (issue 6): no raw API key or agent id anywhere throttle writes, a TLS store with an
ACL user, and credentials that never show.

One real ``celery worker`` (prefork, ``-E``, ``--loglevel DEBUG``) runs a realistic mix against a
store that is a private redis-server over TLS (``rediss://``), reached as an ACL user with the
least permissions throttle needs; then every Redis key and value, every event, every published
header, the worker's whole log and the output of ``celery throttle`` are scanned for the raw
values. The scanner is checked on its own first, so the scan can fail.

The worker and ``celery`` subprocesses import this module as their app
(``celery -A tests.test_security:app``): :func:`build_app` builds it from
``$THROTTLE_SECURITY_SPEC`` when ``app`` is first looked up, never at import time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil
import pytest
import redis
from celery import Celery
from celery.bin.base import CLIContext
from celery.signals import after_task_publish
from click.testing import CliRunner
from redis.exceptions import NoScriptError

import throttle
from tests.conftest import TIMEOUT
from tests.provider import Provider
from tests.redis_servers import HOST, RedisServer, find_redis_server
from tests.workers import ROOT, worker_argv
from throttle.celeryext import headers as H
from throttle.celeryext.cli import throttle as throttle_cli
from throttle.celeryext.settings import redact_url
from throttle.celeryext.worker import extension
from throttle.errors import ConfigurationError, StoreUnavailable

# -- the secrets: distinctive, so that any part of one is recognisable ------------------------

#: Passed as task arguments: they travel in the message body the user publishes.
RAW_KEY = "sk-RAWKEY-live-5b8f3e1a9c7d"
RAW_AGENT = "agent-RAWAGENT-researcher-2c4e9a71f06b"
RAW_KEY_429 = "sk-RAWSLOWKEY-8d1f6a0b3e92"
#: Passed only in the ``throttle_identity`` header, which the publisher seals: nowhere raw.
HEADER_KEY = "sk-RAWHDRKEY-7e3a1c9f4b20"
HEADER_AGENT = "agent-RAWHDRAGENT-planner-91d7c3e5a08f"
#: The store's ACL user and its password.
ACL_USER = "throttle-app"
PASSWORD = "pw-RAWPASSWORD-c0ffee4e1b2d"
WRONG_PASSWORD = "pw-RAWWRONGPASS-6a5f0c93d1e7"

ARG_SECRETS = (RAW_KEY, RAW_AGENT, RAW_KEY_429)
SECRETS = (*ARG_SECRETS, HEADER_KEY, HEADER_AGENT, PASSWORD, WRONG_PASSWORD)

KEY_SECRET = "security-suite-secret-0123456789abcdef"

#: The least a throttle store user needs: the scripts (loaded again after SCRIPT FLUSH or a
#: restart), the commands they call, and from Python the traffic counts (a transaction) and
#: ``celery throttle`` (SCAN, which key patterns do not restrict). Keys: ``throttle:*`` (the
#: key prefix), no Pub/Sub channels. A URL naming a database other than 0 needs ``select``.
#: redis-py sends ``CLIENT SETINFO`` on connecting and ignores a refusal, which Redis 7.2+
#: logs (6.2 as ``client``; 7.0 answers "unknown subcommand"): grant ``client|setinfo`` there to
#: keep ``ACL LOG`` quiet.
ACL_COMMANDS = (
    "evalsha",
    "script|load",
    "time",
    "get",
    "set",
    "mget",
    "del",
    "exists",
    "pexpire",
    "hset",
    "hdel",
    "hmget",
    "hgetall",
    "zadd",
    "zcard",
    "zrange",
    "zrangebyscore",
    "zrem",
    "zremrangebyscore",
    "zscore",
    "scan",
    "multi",
    "exec",
    "hincrbyfloat",
    "expire",
)

LIMITS: dict[str, Any] = {
    "per-key": {"rate": "100/m", "burst": 20, "upstream": "requests"},
    "per-agent": {"rate": "2/h", "burst": 2, "per": ["api_key", "agent_id"]},
    "tokens": {"rate": "1000/h", "burst": 4000, "unit": "tokens", "max_cost": 1000},
    "hourly": {"rate": "1000/h", "algorithm": "sliding_window"},
    "everyone": {"rate": "10000/h", "burst": 1000, "per": []},
    "beta": {"rate": "1/h", "burst": 1, "per": ["api_key", "agent_id"], "mode": "shadow"},
}
MAX_TOKENS = 200
#: A generous estimate, four times the most a call can use: settlement refunds most of it.
ESTIMATE = 4 * MAX_TOKENS

SPEC_VAR = "THROTTLE_SECURITY_SPEC"
APP_PATH = "tests.test_security:app"


# -- the app the worker runs -------------------------------------------------------------------


def build_app(spec: Mapping[str, Any], *, current: bool = False) -> Celery:
    """The app of the scan, for the producer (this process) and for the worker and ``celery``
    subprocesses: ``spec`` names the broker, backend, store and provider URLs, and the Redis
    the worker records the headers it publishes in."""
    app = Celery("security", broker=spec["broker"], backend=spec["backend"], set_as_current=current)
    app.conf.update(
        throttle_redis_url=spec["store"],
        throttle_key_secret=KEY_SECRET,
        throttle_limits=LIMITS,
        throttle_max_defer=1.0,
        throttle_heartbeat_interval=1.0,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )
    throttle.Throttle(app)
    provider = str(spec["provider"])

    @app.task(
        name="security.chat",
        shared=False,
        throttle=["per-key", "per-agent", "tokens", "hourly", "everyone", "beta"],
        throttle_cost={"tokens": ESTIMATE},
    )
    def chat(prompt: str, *, api_key: str, agent_id: str) -> int:
        """One call to the simulated provider; a 429 leaves as httpx's error, which the gate
        turns into a deferral."""
        message = {"role": "user", "content": prompt}
        body = {"model": "sim", "messages": [message], "max_tokens": MAX_TOKENS}
        answer = httpx.post(provider, json=body, headers={"x-api-key": api_key}, timeout=10)
        answer.raise_for_status()
        throttle.report_upstream(answer.headers)
        used = int(answer.json()["usage"]["total_tokens"])
        throttle.report_usage({"tokens": used})
        return used

    @app.task(name="security.plan", shared=False, throttle=["per-key", "per-agent"])
    def plan(step: int) -> int:
        """Work whose identity comes only in the ``throttle_identity`` header."""
        return step

    return app


_built: dict[str, Celery] = {}


def __getattr__(name: str) -> Any:
    """``app``: the app of ``celery -A tests.test_security:app`` in a subprocess, built from
    ``$THROTTLE_SECURITY_SPEC`` on first use; it records every header it publishes."""
    if name != "app":
        raise AttributeError(name)
    if "app" not in _built:
        spec = json.loads(os.environ[SPEC_VAR])
        record = redis.Redis.from_url(spec["record"])
        _built["app"] = build_app(spec, current=True)
        after_task_publish.connect(_recorder(record.rpush), weak=False)
    return _built["app"]


def _recorder(push: Callable[[str, str], Any]) -> Callable[..., None]:
    """A receiver of ``after_task_publish`` that keeps the headers of the app's messages."""

    def record(sender: Any = None, headers: Mapping[str, Any] | None = None, **_: Any) -> None:
        if isinstance(sender, str) and sender.startswith("security."):
            push("headers", json.dumps(headers, default=repr, sort_keys=True))

    return record


# -- the scanner -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    where: str
    secret: str
    excerpt: str


def _recognisable(secret: str) -> list[str]:
    """The secret and its parts that would still give it away: the ``RAW...`` marker and the
    random tail."""
    parts = secret.split("-")
    return [secret, *(p for p in parts if p.startswith("RAW")), parts[-1]]


def _b64_forms(data: bytes) -> list[bytes]:
    """What ``data`` looks like inside any base64 text (standard or URL-safe), at each of the
    three alignments: the encoding's middle, which does not depend on the bytes around it."""
    forms = []
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(bytes(pad) + data)
            middle = encoded[4 if pad else 0 : len(encoded) - 4]
            if len(middle) >= 12:
                forms.append(middle)
    return forms


class Scanner:
    """Finds the secrets, whole or by a recognisable part, in text or bytes: as they are (any
    case), hex-encoded or base64-encoded."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.plain: list[tuple[bytes, str]] = []
        self.exact: list[tuple[bytes, str]] = []
        for secret in secrets:
            for part in _recognisable(secret):
                self.plain.append((part.lower().encode(), secret))
            whole = secret.encode()
            self.exact.append((whole.hex().encode(), secret))
            self.exact.extend((form, secret) for form in _b64_forms(whole))

    def scan(self, where: str, data: str | bytes, allowed: Collection[str] = ()) -> list[Finding]:
        """Every secret not ``allowed`` that ``data`` gives away (one finding per secret)."""
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
        low = raw.lower()
        found: dict[str, Finding] = {}
        for haystack, needles in ((low, self.plain), (raw, self.exact)):
            for needle, secret in needles:
                if secret in allowed or secret in found:
                    continue
                at = haystack.find(needle)
                if at >= 0:
                    excerpt = raw[max(0, at - 60) : at + len(needle) + 60]
                    found[secret] = Finding(where, secret, excerpt.decode(errors="replace"))
        return list(found.values())


def message_parts(value: bytes) -> tuple[bytes, bytes | None]:
    """A kombu message as the Redis transport keeps it (a JSON envelope in a queue, or in the
    ``unacked`` hash a JSON list whose first item is the envelope): the envelope without its
    body, and the body decoded. Anything else: the value as it is, and None."""
    try:
        data = json.loads(value)
    except ValueError:
        return value, None
    envelope = data[0] if isinstance(data, list) and data else data
    if not (isinstance(envelope, dict) and "body" in envelope and "properties" in envelope):
        return value, None
    body = envelope["body"]
    properties = envelope["properties"]
    if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    elif isinstance(body, str):
        body = body.encode()
    rest: Any = {**envelope, "body": None}
    if envelope is not data:
        rest = [rest, *data[1:]]
    return json.dumps(rest).encode(), body if isinstance(body, bytes) else None


def redis_values(client: redis.Redis, key: bytes) -> list[bytes]:
    """Every field, member and value of ``key``, whatever its type."""
    db: Any = client  # redis-py's annotations admit its asyncio client's awaitables
    kind = _text(db.type(key))
    found: list[Any]
    if kind == "string":
        found = [db.get(key)]
    elif kind == "hash":
        found = [item for pair in db.hgetall(key).items() for item in pair]
    elif kind == "list":
        found = db.lrange(key, 0, -1)
    elif kind == "set":
        found = list(db.smembers(key))
    elif kind == "zset":
        found = [item for pair in db.zrange(key, 0, -1, withscores=True) for item in pair]
    elif kind == "stream":
        found = []
        for entry_id, fields in db.xrange(key):
            found += [entry_id, *(item for pair in fields.items() for item in pair)]
    else:
        found = [db.dump(key)]
    return [v if isinstance(v, bytes) else str(v).encode() for v in found if v is not None]


@dataclass
class RedisScan:
    """What a scan of a Redis server saw, and what it found."""

    findings: list[Finding]
    keys: list[bytes]
    bodies: int


def scan_redis(connect: Callable[[int], redis.Redis], label: str, scanner: Scanner) -> RedisScan:
    """SCAN every key of every database of a server and read every value by its type. Message
    bodies (the task's arguments as published) may hold the argument secrets; nothing else may
    hold any secret."""
    with contextlib.closing(connect(0)) as first:
        info = first.info("keyspace")
    result = RedisScan([], [], 0)
    for db in sorted(int(name[2:]) for name in info if name.startswith("db")):
        with contextlib.closing(connect(db)) as client:
            for key in client.scan_iter(count=1000):
                where = f"{label} db{db} {key!r}"
                result.keys.append(key)
                result.findings += scanner.scan(where, key)
                for value in redis_values(client, key):
                    rest, body = message_parts(value)
                    result.findings += scanner.scan(where, rest)
                    if body is not None:
                        result.bodies += 1
                        result.findings += scanner.scan(f"{where} body", body, ARG_SECRETS)
    return result


#: Celery's own DEBUG line that shows a message on its way to the pool, body included.
POOL_APPLY = "TaskPool: Apply"


def scan_log(where: str, text: str, scanner: Scanner) -> list[Finding]:
    """Every line of a log; Celery's :data:`POOL_APPLY` lines show the message body as
    published, and so may hold the argument secrets (nothing else)."""
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        allowed = ARG_SECRETS if POOL_APPLY in line else ()
        findings += scanner.scan(f"{where}:{number}", line, allowed)
    return findings


def test_the_scanner_finds_what_it_looks_for(redis_client: redis.Redis) -> None:
    """The scanner finds a planted raw key in each kind of Redis value, inside a message's
    headers, base64-encoded, by a part of it, in any case and in a log line; a message body
    and Celery's pool line may hold the argument secrets, never the header-only ones."""
    scanner = Scanner(SECRETS)
    redis_client.set("s", f"x{RAW_KEY}x")
    redis_client.hset("h", "field", f"agent={RAW_AGENT.upper()}")
    redis_client.rpush("l", b"-" + base64.b64encode(f"id:{RAW_KEY_429}".encode()))
    redis_client.sadd("m", "5b8f3e1a9c7d")  # RAW_KEY's random tail, alone
    redis_client.zadd("z", {f"tok:{HEADER_KEY}": 1.0})
    redis_client.xadd("x", {"note": f"{PASSWORD}"})
    redis_client.set("clean", "nothing to see")
    envelope = {
        "body": base64.b64encode(json.dumps([[RAW_KEY], {"agent": HEADER_AGENT}]).encode()),
        "headers": {"argsrepr": f"('{RAW_AGENT}',)"},
        "properties": {"body_encoding": "base64"},
    }
    redis_client.rpush("celery", json.dumps(envelope, default=bytes.decode))
    clean = {**envelope, "headers": {}, "body": base64.b64encode(json.dumps([RAW_KEY]).encode())}
    redis_client.hset("unacked", "tag", json.dumps([clean, "", "celery"], default=bytes.decode))
    port = redis_client.connection_pool.connection_kwargs["port"]

    def connect(n: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, db=n)

    seen = scan_redis(connect, "planted", scanner)
    found = {(f.where.split(" ", 2)[2], f.secret) for f in seen.findings}
    assert found == {
        ("b's'", RAW_KEY),
        ("b'h'", RAW_AGENT),
        ("b'l'", RAW_KEY_429),
        ("b'm'", RAW_KEY),
        ("b'z'", HEADER_KEY),
        ("b'x'", PASSWORD),
        ("b'celery'", RAW_AGENT),  # in the headers
        ("b'celery' body", HEADER_AGENT),  # the body may hold RAW_KEY, never HEADER_AGENT
    }, seen.findings
    assert seen.bodies == 2
    log = f"a\nDEBUG/MainProcess] {POOL_APPLY} <fn> (args:{RAW_KEY!r})\nkey {RAW_KEY}\n"
    assert [(f.where, f.secret) for f in scan_log("log", log, scanner)] == [("log:3", RAW_KEY)]
    assert scanner.scan("line", f"{POOL_APPLY} {HEADER_KEY}", ARG_SECRETS)


# -- a private redis-server with TLS and an ACL user -------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def make_certificates(openssl: str, where: Path) -> Path:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it; the CA's path."""
    (where / "server.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        f"subjectAltName = IP:{HOST}\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    for command in (
        f"req -x509 {ec} -keyout ca.key -out ca.crt -days 1 -subj /CN=throttle-test-CA"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        f"req -new {ec} -keyout server.key -out server.csr -subj /CN={HOST}",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt"
        " -days 1 -extfile server.ext",
    ):
        subprocess.run([openssl, *command.split()], cwd=where, check=True, capture_output=True)
    return where / "ca.crt"


@dataclass
class SecureServer:
    """A private redis-server with an ACL user (:data:`ACL_USER`, :data:`ACL_COMMANDS`) and,
    when its binary has TLS, a TLS port beside the plain one (the plain port is for the
    suite's readiness probe and for the test's own administration, as the default user)."""

    server: RedisServer
    tls_port: int | None
    ca: Path | None
    why_no_tls: str = ""

    def admin(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.server.port, db=db)

    def url(self, *, password: str = PASSWORD, tls: bool = True) -> str:
        """The store URL of the ACL user: ``rediss://`` on the TLS port when there is one."""
        if tls and self.tls_port is not None:
            return (
                f"rediss://{ACL_USER}:{password}@{HOST}:{self.tls_port}/0"
                f"?ssl_ca_certs={self.ca}&ssl_cert_reqs=required"
            )
        return f"redis://{ACL_USER}:{password}@{HOST}:{self.server.port}/0"

    def acl_denials(self) -> list[dict[str, Any]]:
        """What the server refused the ACL user since the last reset (``ACL LOG``)."""
        with contextlib.closing(self.admin()) as admin:
            entries = admin.execute_command("ACL", "LOG")
        found = []
        for entry in entries:
            fields = dict(zip(entry[::2], entry[1::2], strict=True))
            fields = {_text(k): _text(v) for k, v in fields.items()}
            # redis-py's CLIENT SETINFO (see ACL_COMMANDS), "client" on Redis 6.2
            if fields.get("object") not in ("client|setinfo", "client"):
                found.append(fields)
        return found

    def reset(self) -> None:
        """Empty every database and the ACL log."""
        with contextlib.closing(self.admin()) as admin:
            admin.flushall()
            admin.execute_command("ACL", "LOG", "RESET")


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    """The store of this module's tests: TLS (certificates made now with the ``openssl``
    command) and the least-privileged ACL user; plain TCP with the same user where the
    redis-server binary (or the machine) has no TLS."""
    binary = find_redis_server()
    openssl = shutil.which("openssl")
    why_no_tls = "" if openssl else "no `openssl` command to make certificates with"
    server: RedisServer | None = None
    tls_port: int | None = None
    ca: Path | None = None
    if openssl:
        ca = make_certificates(openssl, tmp_path_factory.mktemp("tls"))
        files = ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
        files += ["--tls-cert-file", str(ca.parent / "server.crt")]
        files += ["--tls-key-file", str(ca.parent / "server.key")]
        for attempt in range(3):  # the TLS port, free when picked, may be taken since
            tls_port = _free_port()
            try:
                server = RedisServer(["--tls-port", str(tls_port), *files], binary=binary).start()
                break
            except RuntimeError as exc:
                if "Bad directive" in str(exc):
                    why_no_tls = f"{binary} was built without TLS"
                    tls_port = ca = None
                    break
                if "in use" not in str(exc) or attempt == 2:
                    raise
    if server is None:
        server = RedisServer(binary=binary).start()
    try:
        with contextlib.closing(redis.Redis(host=HOST, port=server.port)) as admin:
            grants = [f"+{command}" for command in ACL_COMMANDS]
            admin.execute_command(
                "ACL", "SETUSER", ACL_USER, "reset", "on", f">{PASSWORD}", "~throttle:*",
                "resetchannels", "-@all", *grants,
            )  # fmt: skip
        yield SecureServer(server, tls_port, ca, why_no_tls)
    finally:
        server.close()


# -- the worker subprocess, its events and the published headers -------------------------------


class Worker:
    """One ``celery worker`` of :data:`APP_PATH` (prefork, task events on, DEBUG log to a
    file); stopped warm on leaving, killed if it does not stop."""

    def __init__(self, app: Celery, env: Mapping[str, str], log: Path) -> None:
        self.app = app
        self.env = dict(env)
        self.log = log
        self.node = f"security@{os.uname().nodename}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        argv = worker_argv(APP_PATH, self.node, extra=["-E", "--loglevel", "DEBUG"])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + TIMEOUT
        try:
            while not self._answers():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start: {self.log.read_text()[-3000:]}")
        except BaseException:
            self.stop()  # never leave a worker behind to take later tests' messages
            raise
        return self

    def _answers(self) -> bool:
        try:
            return bool(self.app.control.ping(destination=[self.node], timeout=0.5))
        except redis.ConnectionError:
            # A pooled connection the server dropped earlier in the run: kombu raises once
            # and connects again on the next ping.
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()
            proc.wait(timeout=TIMEOUT)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Events:
    """Every event of the app's event exchange from the moment the receiver is bound."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Events:
        conn = self._stack.enter_context(self.app.connection_for_read())
        self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event}, app=self.app)
        ready = threading.Event()
        self.receiver.on_consume_ready = lambda *a, **k: ready.set()
        self.thread = threading.Thread(target=self.receiver.capture, kwargs={"wakeup": False})
        self.thread.start()
        assert ready.wait(TIMEOUT), "the event receiver did not bind"
        return self

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.seen.append(event)
            self.changed.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.changed:
            return [e for e in self.seen if e.get("type") == kind]

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        with self.changed:
            if not self.changed.wait_for(done, TIMEOUT):
                kinds = sorted({str(e.get("type")) for e in self.seen})
                raise AssertionError(f"no {what} within {TIMEOUT} s; events seen: {kinds}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.receiver.should_stop = True
        self.thread.join(TIMEOUT)
        self._stack.close()


def _ids(events: Iterable[Mapping[str, Any]]) -> set[str]:
    return {str(e["uuid"]) for e in events}


def _celery(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", APP_PATH, *args],
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_no_raw_key_agent_id_or_password_anywhere_after_a_worker_run(
    secure: SecureServer,
    redis_server: RedisServer,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """After a real worker admitted, deferred (its agent's share binding), settled usage and
    took a provider 429, no raw API key, agent id or store password is in the store, the
    broker, the results, the events, the headers, the DEBUG log or ``celery throttle``'s output.

    Scanned: every key and value of every database of both Redis servers (the store over TLS as
    the ACL user; the broker, results and header record), read by type; every event on the
    event exchange, the producer's ``task-sent`` included; the headers of every message
    published, by the producer here and by the worker (deferred copies, from its main process
    and from a pool child), recorded by ``after_task_publish``; the worker's whole log at DEBUG
    (main process and pool); the output of ``celery throttle status|inspect|suggest --json``,
    ``celery report`` and of ``factor`` and ``reset``.

    Not scanned for the argument secrets: a message's body. Users pass the API key and agent id
    as task arguments, so the body they publish holds them, and so does every deferred copy
    (the same arguments, re-published), as does Celery's DEBUG line that shows a message on
    its way to the pool (:data:`POOL_APPLY`). The header-only identity and the password are
    looked for there too: work whose identity comes in the sealed ``throttle_identity`` header
    has no raw value anywhere. (Celery's ``result_extended`` would store the arguments with
    the result; it is off, as by default.)

    The store is reached over TLS by the worker's event loop (pipelined admissions) and pool,
    and by ``celery throttle``, all as the ACL user: its ACL log stays empty."""
    scanner = Scanner(SECRETS)
    secure.reset()
    base = redis_server.url.rsplit("/", 1)[0]
    with Provider(capacity=100, capacities={RAW_KEY_429: 0.01}) as provider:
        spec = {
            "broker": f"{base}/1",
            "backend": f"{base}/2",
            "record": f"{base}/3",
            "store": secure.url(),
            "provider": provider.url,
        }
        env = {
            **os.environ,
            SPEC_VAR: json.dumps(spec),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        app = build_app(spec)
        published: list[str] = []
        record = _recorder(lambda _, headers: published.append(headers))
        after_task_publish.connect(record, weak=False)
        # The load factor held at 1: on a busy machine the workers' load would scale the
        # buckets (adaptive limits are the default), and the settled usage checked below with
        # them: a charge at one factor and its refund at another do not cancel.
        extension(app).store().override_load_factor(1.0)
        try:
            with Events(app) as events, Worker(app, env, tmp_path / "worker.log") as worker:
                chat, plan = app.tasks["security.chat"], app.tasks["security.plan"]
                for i in range(4):  # burst 2 of the agent's share: 2 run, 2 deferred
                    chat.delay(f"step {i}", api_key=RAW_KEY, agent_id=RAW_AGENT)
                chat.delay("too fast", api_key=RAW_KEY_429, agent_id=RAW_AGENT)  # a 429
                identity = {"api_key": HEADER_KEY, "agent_id": HEADER_AGENT}
                for i in range(3):  # 2 run, 1 deferred
                    plan.apply_async((i,), headers={H.IDENTITY: identity})
                events.wait_for(
                    "4 successes and 4 deferred tasks, one by the provider, one deferred twice",
                    lambda: (
                        len(_ids(events.of("task-succeeded"))) == 4
                        and len(_ids(events.of("task-throttled"))) >= 4
                        and any(e["reason"] == "upstream" for e in events.of("task-throttled"))
                        and any(e["deferrals"] >= 2 for e in events.of("task-throttled"))
                    ),
                )
                worker.stop()
        finally:
            after_task_publish.disconnect(record)
        assert provider.count(RAW_KEY, 200) == 2
        assert provider.count(RAW_KEY_429, 429) >= 1
    # celery throttle, as an operator runs it; celery report, as one pastes it into a bug report
    runs = {
        "status": _celery(env, "throttle", "status", "--json"),
        "inspect": _celery(
            env, "throttle", "inspect", "--api-key", RAW_KEY, "--agent-id", RAW_AGENT, "--json"
        ),
        "inspect-header": _celery(env, "throttle", "inspect", "--api-key", HEADER_KEY, "--json"),
        "suggest": _celery(env, "throttle", "suggest", "--json"),
        "report": _celery(env, "report"),
    }
    outputs = {name: run.communicate(timeout=TIMEOUT) for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, (name, outputs[name])
    for args in (["factor", "0.5"], ["factor", "clear"], ["reset", "--api-key", HEADER_KEY]):
        result = CliRunner().invoke(
            throttle_cli, [*args, "--yes"] if args[0] == "reset" else args,
            obj=CLIContext(app, True, None),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[" ".join(args)] = (result.output, "")

    # What the run did, so that the scan is not of nothing.
    fp = extension(app).keyspace.fingerprint
    throttled = events.of("task-throttled")
    assert {e["reason"] for e in throttled} <= {"booked", "horizon", "early", "upstream", "denied"}
    assert fp("api_key", RAW_KEY) in {e["key"] for e in throttled}
    assert fp("api_key", HEADER_KEY) in {e["key"] for e in throttled}
    inspected = json.loads(outputs["inspect"][0])
    assert inspected["key"] == fp("api_key", RAW_KEY)
    tokens = {row["limit"]: row for row in inspected["limits"]}["tokens"]
    assert inspected["load_factor"] == 1.0
    assert tokens["remaining"] > 4000 - 2 * ESTIMATE + 500  # the two runs' usage was settled
    assert json.loads(outputs["inspect-header"][0])["key"] == fp("api_key", HEADER_KEY)
    assert "throttle_redis_url" in outputs["report"][0]
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert POOL_APPLY in log  # DEBUG reached Celery
    assert f"key {fp('api_key', RAW_KEY)}" in log  # and throttle's own debug lines
    assert "throttle store" not in log  # the store (TLS, ACL user) answered every time
    with contextlib.closing(redis.Redis.from_url(spec["record"])) as db:
        worker_headers = [json.loads(h) for h in db.lrange("headers", 0, -1)]  # type: ignore[union-attr]
    assert any(H.TOKEN in h for h in worker_headers)  # the deferred copies' headers
    sealed = [h[H.IDENTITY] for h in map(json.loads, published) if H.IDENTITY in h]
    assert len(sealed) == 3
    assert all(s["sealed"] == 1 for s in sealed)

    findings: list[Finding] = []
    store = scan_redis(secure.admin, "store", scanner)
    broker = scan_redis(
        lambda db: redis.Redis(host=HOST, port=redis_server.port, db=db), "broker", scanner
    )
    findings += store.findings + broker.findings
    assert any(fp("api_key", RAW_KEY).encode() in key for key in store.keys)
    assert broker.bodies >= 1  # deferred copies still in the broker
    for event in events.seen:
        findings += scanner.scan(f"event {event.get('type')}", json.dumps(event, default=repr))
    for number, headers in enumerate(published):
        findings += scanner.scan(f"published headers {number}", headers)
    findings += scan_log("worker.log", log, scanner)
    for name, (out, err) in outputs.items():
        findings += scanner.scan(f"celery {name} stdout", out)
        findings += scanner.scan(f"celery {name} stderr", err)
    assert findings == []
    assert secure.acl_denials() == []

    # The same scan finds a raw key planted in the store.
    with contextlib.closing(secure.admin()) as admin:
        admin.hset("planted", "note", f"api key {RAW_KEY}")
    planted = scan_redis(secure.admin, "store", scanner).findings
    assert [(f.where, f.secret) for f in planted] == [("store db0 b'planted'", RAW_KEY)]


# -- TLS, the ACL user, and credentials that never show ----------------------------------------


def _store_app(url: str, **conf: Any) -> tuple[Celery, throttle.Throttle]:
    app = Celery("tls", broker="memory://", set_as_current=False)
    app.conf.update(
        throttle_redis_url=url,
        throttle_key_secret=KEY_SECRET,
        throttle_limits={"req": {"rate": "1/h", "burst": 5}},
        throttle_socket_timeout=2.0,
        **conf,
    )
    return app, throttle.Throttle(app)


def _pipelined(store: throttle.RedisStore, prepared: list[Any]) -> list[Any]:
    """Send every prepared admission on a link of its own at once, then collect the replies
    as the worker's event loop does: wait until the socket is readable, take what arrived."""
    pipeline = store.pipeline()
    assert pipeline is not None
    link, encode = pipeline
    try:
        for item in prepared:
            link.send(encode(item))
        replies: list[Any] = []
        deadline = time.monotonic() + TIMEOUT
        while len(replies) < len(prepared):
            readable, _, _ = select.select([link], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, f"{len(replies)} of {len(prepared)} replies"
            replies += link.ready()
        return replies
    finally:
        link.close()


def test_tls_url_with_an_acl_user_admits_on_every_path(secure: SecureServer) -> None:
    """A ``rediss://`` URL with the CA in its query and an ACL user admits through the gate,
    the store's hot path and pipelined admissions (several in flight, replies as they come),
    and after SCRIPT FLUSH the pipelined replies say NOSCRIPT and the next admission reloads
    the scripts; the same user works over plain ``redis://user:password@``."""
    if secure.tls_port is None:
        pytest.skip(secure.why_no_tls)
    secure.reset()
    app, ext = _store_app(secure.url())

    @app.task(name="tls.step", shared=False, throttle=["req"])
    def step(*, api_key: str) -> None:
        pass

    kwargs = {"api_key": RAW_KEY}
    verdicts = [ext.gate.check(step, f"t{i}", (), kwargs, {}).action.value for i in range(2)]
    assert verdicts == ["run", "run"]
    store = ext.store()
    assert isinstance(store, throttle.RedisStore)
    limit = throttle.Limit("req", "1/h", burst=5)
    identity = {"api_key": RAW_KEY}
    assert store.admit([limit], identity).allowed  # the hot path, one call at a time
    prepared = [store.prepare([limit], identity) for _ in range(40)]
    replies = _pipelined(store, prepared)
    decisions = [store.finish(p, r) for p, r in zip(prepared, replies, strict=True)]
    assert [d.allowed for d in decisions] == [True, True] + [False] * 38
    with contextlib.closing(secure.admin()) as admin:
        admin.script_flush()
    lost = _pipelined(store, [store.prepare([limit], identity) for _ in range(3)])
    assert all(isinstance(reply, NoScriptError) for reply in lost)
    assert not store.admit([limit], identity).allowed  # reloaded, and the bucket is empty
    _, plain = _store_app(secure.url(tls=False))
    assert plain.gate.check(step, "p1", (), {"api_key": HEADER_KEY}, {}).action.value == "run"
    assert secure.acl_denials() == []


def _chain(errors: Iterable[BaseException]) -> Iterator[BaseException]:
    """Each error and the errors it was raised from or during."""
    for error in errors:
        seen: BaseException | None = error
        while seen is not None:
            yield seen
            seen = seen.__cause__ or seen.__context__


def test_credentials_never_show_in_reprs_logs_or_errors(
    secure: SecureServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With a wrong password (TLS or not) the gate falls back and logs, the heartbeat and
    ``celery throttle`` fail with one line, and the configuration's reprs, errors, Celery's
    report and the ``inspect conf`` table show neither that password nor the right one;
    ``redact_url`` also hides passwords in the query and keeps an IPv6 host."""
    caplog.set_level(logging.DEBUG)
    passwords = Scanner([PASSWORD, WRONG_PASSWORD])
    for tls in (True, False):
        app, ext = _store_app(secure.url(password=WRONG_PASSWORD, tls=tls))

        @app.task(name="creds.step", shared=False, throttle=["req"])
        def step(*, api_key: str) -> None:
            pass

        assert ext.gate.check(step, "w1", (), {"api_key": RAW_KEY}, {}).action.value == "run"
        errors: list[BaseException] = []
        with pytest.raises(StoreUnavailable) as info:
            ext.heartbeat("me")
        errors.append(info.value)
        pipeline = ext.store().pipeline()  # type: ignore[attr-defined]
        with pytest.raises(redis.AuthenticationError) as refused:
            pipeline[0].fileno()  # the event loop's link connects
        errors.append(refused.value)
        result = CliRunner().invoke(throttle_cli, ["status"], obj=CLIContext(app, True, None))
        assert result.exit_code == 1
        assert "did not answer" in result.output
        assert len(result.output.strip().splitlines()) == 1
        conf = app.conf.table()  # what `celery inspect conf` sends, and Flower shows
        assert "throttle_redis_url" in conf
        shown = {
            "log": caplog.text,
            "cli": result.output,
            "repr": f"{ext!r} {ext.settings!r} {ext.store()!r} {ext.store().client!r}",  # type: ignore[attr-defined]
            "report": app.conf.humanize(),  # `celery report`
            "inspect conf": json.dumps(conf, default=repr),
        }
        for number, error in enumerate(_chain(errors)):
            shown[f"error {number}"] = f"{error} {error!r}"
        assert [f for name, text in shown.items() for f in passwords.scan(name, text)] == []
    with pytest.raises(ConfigurationError) as bad:
        _store_app(f"http://{ACL_USER}:{PASSWORD}@{HOST}/0?password={PASSWORD}")
    assert passwords.scan("configuration error", str(bad.value)) == []
    query = f"rediss://{HOST}:6380/0?ssl_ca_certs=/ca.pem&password={PASSWORD}&db=1"
    assert redact_url(query) == f"rediss://{HOST}:6380/0?ssl_ca_certs=/ca.pem&password=***&db=1"
    both = f"redis://{ACL_USER}:{PASSWORD}@[::1]:6379/0?ssl_password={WRONG_PASSWORD}"
    assert redact_url(both) == f"redis://{ACL_USER}:***@[::1]:6379/0?ssl_password=***"
    assert (
        redact_url(f"unix://:{PASSWORD}@/run/redis.sock?db=0") == "unix://:***@/run/redis.sock?db=0"
    )
