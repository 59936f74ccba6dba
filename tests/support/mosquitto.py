"""A real mosquitto broker for tests and benchmarks, plus an MQTT recorder built on aiomqtt.

``Mosquitto`` is synchronous on purpose: pytest fixtures and plain benchmark scripts both drive it
without an event loop. ``Recorder`` is the asynchronous half: it subscribes, records everything it
receives, and keeps doing so across broker restarts, so tests can assert on what actually arrived.

The broker runs on loopback ports picked at construction time and keeps them across ``restart()``,
which is what lets a client under test reconnect to the address it was configured with.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import getpass
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    import trustme

__all__ = [
    "BrokerStartError",
    "ClientCert",
    "Mosquitto",
    "Received",
    "Recorder",
    "mosquitto_passwd_path",
    "mosquitto_path",
    "require_mosquitto",
]

HOST = "127.0.0.1"

# Debian installs the broker in /usr/sbin, which is not on PATH for ordinary users.
_FALLBACK_BINARIES = {
    "mosquitto": Path("/usr/sbin/mosquitto"),
    "mosquitto_passwd": Path("/usr/bin/mosquitto_passwd"),
}


def _find_binary(name: str) -> Path | None:
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    fallback = _FALLBACK_BINARIES[name]
    return fallback if os.access(fallback, os.X_OK) else None


def mosquitto_path() -> Path | None:
    """The mosquitto broker binary, or None when it is not installed."""
    return _find_binary("mosquitto")


def mosquitto_passwd_path() -> Path | None:
    """The mosquitto_passwd tool (needed only for ``users=``), or None when not installed."""
    return _find_binary("mosquitto_passwd")


def require_mosquitto(*, passwd: bool = False) -> None:
    """Skip the calling test when mosquitto is missing, or fail it when running under CI.

    CI installs mosquitto, so a missing binary there is a broken setup, not a reason to skip the
    broker tests silently. ``passwd=True`` also requires mosquitto_passwd (for ``users=``).
    """
    import pytest  # only tests call this; benchmark scripts must not need pytest

    missing = [
        name
        for name, found in (
            ("mosquitto", mosquitto_path()),
            ("mosquitto_passwd", mosquitto_passwd_path() if passwd else Path()),
        )
        if found is None
    ]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (apt-get install mosquitto)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason}: CI must run the broker tests", pytrace=False)
    pytest.skip(reason)


class BrokerStartError(RuntimeError):
    """mosquitto did not come up; the message carries the tail of its log."""


@dataclasses.dataclass(frozen=True)
class ClientCert:
    """A client certificate and its private key, as PEM files signed by the broker's test CA."""

    cert_file: Path
    key_file: Path


def _pick_free_ports(count: int) -> list[int]:
    # All sockets stay bound until every port is read so the kernel cannot hand out the same port
    # twice. A socket that was only bound (never connected) leaves no TIME_WAIT behind.
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# Brokers still running at interpreter exit (a benchmark interrupted outside its ``with`` block, a
# fixture that never reached teardown) are killed so they do not outlive the process that owns them.
_LIVE: weakref.WeakSet[Mosquitto] = weakref.WeakSet()


@atexit.register
def _kill_leftover_brokers() -> None:
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.kill()


class Mosquitto:
    """One mosquitto process listening on 127.0.0.1, configured from Python.

    Everything it needs or writes (config, password file, certificates, log, persistence) lives in
    ``work_dir``. Ports are chosen when the object is built, so ``port``/``url`` are usable before
    ``start()`` and stay the same across ``restart()``.

    ``extra_config`` lines go into the global section, before the listeners (e.g.
    ``["message_size_limit 1024"]``). They must not turn off logging to stderr at "information"
    level: readiness is detected from the broker's "running" line.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        tls: bool = False,
        require_certificate: bool = False,
        users: Mapping[str, str] | None = None,
        persistence: bool = False,
        extra_config: Sequence[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        if require_certificate and not tls:
            raise ValueError("require_certificate=True needs tls=True")
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.require_certificate = require_certificate
        self.users: dict[str, str] | None = dict(users) if users is not None else None
        self.persistence = persistence
        self.extra_config = tuple(extra_config)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

        self.host = HOST
        self.port, self.tls_port = self._pick_ports()
        self.config_file = self.work_dir / "mosquitto.conf"
        self.log_file = self.work_dir / "mosquitto.log"
        self.password_file: Path | None = None
        self.persistence_dir = self.work_dir / "persistence"
        self.ca_file: Path | None = None
        self._ca: trustme.CA | None = None  # trustme is imported only when tls=True
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # Until the first successful start the ports may be re-picked if someone else grabbed them
        # in the meantime; afterwards they are part of the contract (clients were given them).
        self._ports_committed = False

        if tls:
            self._make_server_certificates()
        if self.users is not None:
            self._write_password_file(self.users)

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener (construct it with tls=True)")
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        tls = f", tls_port={self.tls_port}" if self.tls_port is not None else ""
        return f"<Mosquitto {state} port={self.port}{tls} work_dir={self.work_dir}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Launch the broker and return once every listener accepts TCP connections."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        deadline = time.monotonic() + self.start_timeout
        bind_failures = 0
        while True:
            self._write_config()
            self._spawn()
            try:
                self._wait_ready(deadline)
            except _BindFailedError:
                # mosquitto exited on "Address already in use". Before the first start nobody
                # knows our ports yet, so pick new ones; after it, the same ports must come back
                # (clients were given them), so retry until whoever holds them lets go.
                bind_failures += 1
                if time.monotonic() >= deadline:
                    raise BrokerStartError(self._failure_message("ports stayed in use")) from None
                if not self._ports_committed:
                    self.port, self.tls_port = self._pick_ports()
                time.sleep(0.05)
                continue
            except BaseException as exc:
                self.kill()
                if bind_failures:
                    exc.add_note(f"earlier attempts failed {bind_failures}x: address in use")
                raise
            self._ports_committed = True
            _LIVE.add(self)
            return self

    def stop(self) -> None:
        """SIGTERM and wait (mosquitto saves persistence on SIGTERM); SIGKILL if it hangs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
        self._proc = None
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL: a crash, as far as clients and persistence are concerned."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._kill_group(proc)
        self._proc = None
        _LIVE.discard(self)

    def restart(self) -> Self:
        """Stop and start again on the same ports (clients reconnect to the same address)."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- logs and TLS material ---------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the broker logged, across restarts (the log file is appended to)."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def issue_client_cert(self, name: str = "client") -> ClientCert:
        """A client certificate (CN and SAN ``name``) signed by the broker's CA, for mutual TLS."""
        if self._ca is None:
            raise RuntimeError("this broker has no TLS listener (construct it with tls=True)")
        leaf = self._ca.issue_cert(name, common_name=name)
        cert_file = self.work_dir / f"client-{name}.crt"
        key_file = self.work_dir / f"client-{name}.key"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key_file.write_bytes(leaf.private_key_pem.bytes())
        key_file.chmod(0o600)
        return ClientCert(cert_file=cert_file, key_file=key_file)

    def client_ssl_context(self, cert: ClientCert | None = None) -> ssl.SSLContext:
        """An SSLContext that trusts the broker's CA (and presents ``cert`` when given)."""
        if self.ca_file is None:
            raise RuntimeError("this broker has no TLS listener (construct it with tls=True)")
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(cert.cert_file, cert.key_file)
        return context

    def tls_parameters(self, cert: ClientCert | None = None) -> aiomqtt.TLSParameters:
        """aiomqtt TLS parameters that trust the broker's CA (and present ``cert`` when given)."""
        if self.ca_file is None:
            raise RuntimeError("this broker has no TLS listener (construct it with tls=True)")
        return aiomqtt.TLSParameters(
            ca_certs=str(self.ca_file),
            certfile=str(cert.cert_file) if cert is not None else None,
            keyfile=str(cert.key_file) if cert is not None else None,
        )

    # -- internals ---------------------------------------------------------------------------

    def _pick_ports(self) -> tuple[int, int | None]:
        ports = _pick_free_ports(2 if self.tls else 1)
        return ports[0], (ports[1] if self.tls else None)

    def _make_server_certificates(self) -> None:
        import trustme  # a dev dependency: only TLS users pay for it

        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.work_dir / "ca.crt"
        ca.cert_pem.write_to_path(str(self.ca_file))
        (self.work_dir / "server.crt").write_bytes(
            b"".join(blob.bytes() for blob in server.cert_chain_pems)
        )
        server_key = self.work_dir / "server.key"
        server.private_key_pem.write_to_path(str(server_key))
        server_key.chmod(0o600)
        self._ca = ca

    def _write_password_file(self, users: Mapping[str, str]) -> None:
        tool = mosquitto_passwd_path()
        if tool is None:
            raise FileNotFoundError("mosquitto_passwd is not installed (it ships with mosquitto)")
        self.password_file = self.work_dir / "passwd"
        for index, (user, password) in enumerate(users.items()):
            # -c creates (truncates) the file for the first user; -b takes the password from argv.
            flags = ["-c", "-b"] if index == 0 else ["-b"]
            subprocess.run(
                [str(tool), *flags, str(self.password_file), user, password],
                check=True,
                capture_output=True,
                timeout=10,
            )

    def _write_config(self) -> None:
        lines = [
            "# Written by tests/support/mosquitto.py; regenerated on every start.",
            # One set of security settings for both listeners: the plain and the TLS listener
            # authenticate the same way, which is what the gateway sees in production.
            "per_listener_settings false",
            f"allow_anonymous {'false' if self.users is not None else 'true'}",
        ]
        if self.password_file is not None:
            lines.append(f"password_file {self.password_file}")
        if os.geteuid() == 0:
            # As root, mosquitto drops to the "mosquitto" user, which cannot read a 0700 pytest
            # tmp dir nor write the persistence directory. Stay the invoking user instead.
            lines.append(f"user {getpass.getuser()}")
        lines += [
            # Tests publish tens of thousands of QoS 1 messages in bursts and to subscribers that
            # are briefly offline; mosquitto's defaults (20 in flight, 1000 queued) would drop
            # them and make the test measure the broker's limits instead of the gateway.
            "max_inflight_messages 1000",
            "max_inflight_bytes 0",
            "max_queued_messages 100000",
            "max_queued_bytes 0",
            # Latency-sensitive request/ack traffic should not wait on Nagle's algorithm.
            "set_tcp_nodelay true",
            "log_dest stderr",
            # "all" would log every PUBLISH, which slows bulk tests and bloats the log.
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            lines += [
                "persistence true",
                # mosquitto concatenates location and file name: the trailing slash matters.
                f"persistence_location {self.persistence_dir}/",
                "persistence_file mosquitto.db",
                # Saved on SIGTERM only; kill() therefore behaves like a crash that loses state.
                "autosave_interval 0",
            ]
        else:
            lines.append("persistence false")
        lines += list(self.extra_config)
        lines.append(f"listener {self.port} {self.host}")
        if self.tls_port is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.ca_file}",
                f"certfile {self.work_dir / 'server.crt'}",
                f"keyfile {self.work_dir / 'server.key'}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        self.config_file.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _spawn(self) -> None:
        with self.log_file.open("ab") as log:
            # A marker makes restarts visible when reading the log of a failed test.
            log.write(f"--- starting mosquitto (port {self.port}) ---\n".encode())
            log.flush()
            # Readiness looks for this start's "running" line only, not an earlier run's.
            self._log_offset = log.tell()
            # Own session/process group: Ctrl-C in a terminal or pytest's signal handling does not
            # reach the broker behind our back, and stop() can signal the whole group.
            self._proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _this_run_log(self) -> str:
        with self.log_file.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", errors="replace")

    def _wait_ready(self, deadline: float) -> None:
        """Poll until this process said it is running and every listener accepts connections.

        A TCP connect alone is not proof: if someone else grabbed a port between picking and
        binding it, the connect reaches them while mosquitto is exiting on "Address already in
        use". mosquitto logs "... running" only after all its listeners are bound, so both
        together mean the ports are ours.
        """
        assert self._proc is not None
        pending = [port for port in (self.port, self.tls_port) if port is not None]
        announced = False
        delay = 0.002
        while True:
            returncode = self._proc.poll()
            if returncode is not None:
                self._proc = None
                if "Address already in use" in self._this_run_log():
                    raise _BindFailedError
                raise BrokerStartError(self._failure_message(f"exited with status {returncode}"))
            announced = announced or _RUNNING_LINE.search(self._this_run_log()) is not None
            while announced and pending and _accepts_connections(self.host, pending[0]):
                pending.pop(0)
            if announced and not pending:
                return
            if time.monotonic() >= deadline:
                awaited = f"port {pending[0]} to accept" if announced else "its running line"
                raise BrokerStartError(self._failure_message(f"timed out waiting for {awaited}"))
            # Polling with a short, growing backoff: mosquitto is usually up within a few ms.
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _failure_message(self, what: str) -> str:
        return f"mosquitto ({self.config_file}) {what}; log tail:\n{self._log_tail()}"


# Logged (at "information" level, which the config enables) once every listener is bound.
_RUNNING_LINE = re.compile(r"mosquitto version \S+ running")


class _BindFailedError(Exception):
    """mosquitto could not bind one of its ports (internal to Mosquitto.start)."""


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- recording subscriber ---------------------------------------------------------------------


def _code_value(code: int | ReasonCode) -> int:
    # aiomqtt returns plain ints or paho ReasonCodes depending on protocol and paho version.
    return code if isinstance(code, int) else code.value


@dataclasses.dataclass(frozen=True)
class Received:
    """One message as the recorder got it."""

    topic: str
    payload: bytes
    retain: bool
    qos: int


Predicate = Callable[[Sequence[Received]], bool]


class Recorder:
    """Subscribe to ``topics`` and record every message until the context exits.

    ``async with Recorder(host, port, topics=["gw/#"]) as rec:`` returns once the broker has
    acknowledged the subscription. A background task (cancelled and awaited on exit) reads the
    messages; if the connection drops it reconnects with a fixed client id and
    ``clean_session=False`` so QoS 1 messages published meanwhile are queued by the broker, then
    re-subscribes (a broker restarted without persistence has forgotten the session).

    The ``wait_*`` methods take a ``timeout`` rather than relying on an outer
    ``asyncio.timeout()`` because their TimeoutError reports what did arrive, which is what one
    needs to debug a failing test.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        topics: Sequence[str] = ("#",),
        qos: int = 1,
        identifier: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        ready_timeout: float = 10.0,
        reconnect_interval: float = 0.05,
    ) -> None:
        if not topics:
            raise ValueError("Recorder needs at least one topic filter")
        self.host = host
        self.port = port
        self.topics = tuple(topics)
        self.qos = qos
        # Fixed for the recorder's lifetime: the broker finds the session again by this id.
        self.identifier = identifier or f"recorder-{uuid.uuid4().hex[:12]}"
        self.username = username
        self.password = password
        self.tls_context = tls_context
        self.ready_timeout = ready_timeout
        self.reconnect_interval = reconnect_interval

        self.messages: list[Received] = []
        self.connected = asyncio.Event()
        #: Successful (connect + SUBACK) sessions so far; 2 means it reconnected once.
        self.connections = 0
        self.last_error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        if self._task is not None:
            raise RuntimeError("Recorder is not reentrant")
        self._task = asyncio.create_task(self._run(), name=f"recorder {self.identifier}")
        # Waiters must learn that the task died (e.g. a bug in a callback) without a timeout.
        self._task.add_done_callback(lambda _task: self._bump())
        try:
            await self._wait_state(lambda: self.connections >= 1, self.ready_timeout, "subscribed")
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        failure = await self._shutdown()
        # A crashed recorder must not let a test pass silently, but must not mask the test's own
        # exception either.
        if failure is not None and exc_type is None:
            raise failure

    # -- queries ------------------------------------------------------------------------------

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [m.payload for m in self.messages if topic is None or m.topic == topic]

    async def wait_for(
        self,
        predicate: Predicate,
        *,
        timeout: float = 10.0,
    ) -> list[Received]:
        """Wait until ``predicate(messages)`` holds; TimeoutError says what did arrive."""
        await self._wait_state(lambda: predicate(self.messages), timeout, "predicate")
        return list(self.messages)

    async def wait_for_count(
        self,
        count: int,
        *,
        timeout: float = 10.0,
    ) -> list[Received]:
        """Wait until at least ``count`` messages were recorded."""
        return await self.wait_for(lambda msgs: len(msgs) >= count, timeout=timeout)

    async def wait_connected(
        self,
        *,
        connections: int = 1,
        timeout: float = 10.0,
    ) -> None:
        """Wait until subscribed for the ``connections``-th time (2 = after one reconnect)."""
        await self._wait_state(
            lambda: self.connected.is_set() and self.connections >= connections,
            timeout,
            f"connection #{connections}",
        )

    def summary(self) -> str:
        last = ", ".join(f"{m.topic}={m.payload[:40]!r}" for m in self.messages[-5:])
        return (
            f"recorder {self.identifier} on {self.host}:{self.port} {list(self.topics)}: "
            f"{len(self.messages)} messages (last: {last or '-'}); "
            f"connected={self.connected.is_set()} connections={self.connections} "
            f"last_error={self.last_error!r}"
        )

    # -- internals ----------------------------------------------------------------------------

    def _bump(self) -> None:
        # Wake every waiter by completing the current Event and installing a fresh one. Being
        # synchronous, it also works from a task's done-callback; waiters check their condition
        # and pick up the Event in one step, so no wake-up can fall between the two.
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_state(self, condition: Callable[[], bool], limit: float, what: str) -> None:
        task = self._task
        try:
            async with asyncio.timeout(limit):
                while not condition():
                    if task is None or task.done():
                        break
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {limit}s waiting for {what}; {self.summary()}"
            ) from None
        if condition():
            return
        # The background task ended (a refused connection or a bug): report it now rather than
        # after the timeout, as the exception itself so tests can assert on its type and code.
        error = task.exception() if task is not None and not task.cancelled() else None
        if error is None:
            raise RuntimeError(f"recorder stopped while waiting for {what}; {self.summary()}")
        error.add_note(f"recorder stopped while waiting for {what}; {self.summary()}")
        raise error

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except MqttConnectError as exc:
                self.last_error = exc
                # A refused CONNACK (bad credentials, not authorised) before the first
                # subscription is a configuration error: retrying would only hide it.
                if self.connections == 0:
                    raise
            except (aiomqtt.MqttError, OSError) as exc:
                # Broker down or restarting: keep trying until the context exits.
                self.last_error = exc
            finally:
                self.connected.clear()
                self._bump()
            await asyncio.sleep(self.reconnect_interval)

    async def _session(self) -> None:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.identifier,
            clean_session=False,
            username=self.username,
            password=self.password,
            tls_context=self.tls_context,
            timeout=5,
            # Short keepalive so a silently vanished broker is noticed within seconds.
            keepalive=5,
        ) as client:
            granted = await client.subscribe([(topic, self.qos) for topic in self.topics])
            # SUBACK codes of 0x80 and above are refusals (e.g. an ACL denies the filter).
            refused = [code for code in granted if _code_value(code) >= 0x80]
            if refused:
                raise RuntimeError(f"broker refused subscription {self.topics}: {refused}")
            self.connections += 1
            self.connected.set()
            self._bump()
            async for message in client.messages:
                # paho always delivers bytes; aiomqtt's type is wider (it is shared with publish).
                payload = message.payload
                assert isinstance(payload, bytes), type(payload)
                self.messages.append(
                    Received(
                        topic=message.topic.value,
                        payload=payload,
                        retain=bool(message.retain),
                        qos=message.qos,
                    )
                )
                self._bump()

    async def _shutdown(self) -> BaseException | None:
        task, self._task = self._task, None
        if task is None:
            return None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            # Swallow only the cancellation we asked for; if our caller is being cancelled too,
            # that must propagate.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        self.connected.clear()
        if task.cancelled():
            return None
        return task.exception()
