"""A Sparkplug B world on loopback for the adapter's tests and benchmark: a real MQTT broker
(amqtt's, in a process of its own that can be killed, paused and started again on the same port)
and an edge node that speaks Sparkplug B as the specification says, with knobs to change its
machine's state, die, skip a seq, answer rebirth requests or not, and send garbage.

The edge node is written here on paho-mqtt 1.x (an MQTT client independent of the adapter's
amqtt) and encodes every payload with pysparkplug (an independent Sparkplug B implementation),
so the adapter's decoder is checked against a third-party encoder, never against itself. What it
does follows Sparkplug 3.0: a will NDEATH carrying ``bdSeq``, set before connecting; an NBIRTH
(seq 0) with every metric, its alias, datatype and ``bdSeq``; a DBIRTH per device; DATA by alias
only; ``seq`` 0..255 across all of them; on an NCMD ``Node Control/Rebirth`` = true, the births
again with the same ``bdSeq``.

``python -m tests.sparkplug_peer broker PORT`` runs the broker alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from pysparkplug import DataType, DBirth, DData, DDeath, Metric, NBirth, NCmd, NData, NDeath

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (so it is its own CA), and its key."""
    cert, key = folder / "broker.pem", folder / "broker.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class Broker:
    """amqtt's broker in a child process on ``port``: ``kill`` it (a crash, no goodbye to
    anyone), ``pause``/``resume`` it (a hung broker: connections open, nothing answered), and
    ``start`` it again on the same port."""

    def __init__(
        self,
        port: int | None = None,
        tls: tuple[Path, Path] | None = None,
        passwords: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        # With (certificate, key): a second listener speaking MQTT over TLS on ``tls_port``.
        self.tls = tls
        self.tls_port = free_port() if tls else None
        # With a password file (``password_file``): no anonymous client is let in.
        self.passwords = passwords
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        args = ["--passwords", str(self.passwords)] if self.passwords else []
        if self.tls:
            args += [str(self.tls_port), *map(str, self.tls)]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.sparkplug_peer", "broker", str(self.port), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.process.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the broker did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)


def password_file(folder: Path, users: dict[str, str]) -> Path:
    """A broker password file (``user:argon2 hash`` lines, as amqtt's FileAuthPlugin reads)."""
    from pwdlib.hashers.argon2 import Argon2Hasher

    path = folder / "passwords"
    hasher = Argon2Hasher()
    path.write_text("".join(f"{user}:{hasher.hash(pw)}\n" for user, pw in users.items()))
    return path


async def _serve_broker(port: int, tls: list[str], passwords: str | None = None) -> None:
    from amqtt.broker import Broker as AmqttBroker

    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}
    if tls:
        tls_port, certfile, keyfile = tls
        listeners["tls"] = {
            "type": "tcp",
            "bind": f"127.0.0.1:{tls_port}",
            "ssl": True,
            "certfile": certfile,
            "keyfile": keyfile,
        }
    plugins: dict[str, Any] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": not passwords}
    }
    if passwords:
        plugins["amqtt.plugins.authentication.FileAuthPlugin"] = {"password_file": passwords}
    broker = AmqttBroker(
        {
            "listeners": listeners,
            "plugins": plugins,
        }
    )
    await broker.start()
    parent = os.getppid()
    while os.getppid() == parent:  # a test or benchmark that died never leaves a broker behind
        await asyncio.sleep(1)


@dataclass
class Tag:
    """One metric of the edge node (or of one of its devices): its datatype and value now."""

    datatype: DataType
    value: Any
    alias: int
    timestamp: int


class EdgeNode:
    """A Sparkplug B edge node (paho-mqtt 1.x, payloads by pysparkplug) on ``port``.

    ``metrics`` are the node's own; ``devices`` maps each device id to its metrics; each metric
    is ``name: (DataType, value)``. Every change is sent as NDATA/DDATA by alias only."""

    def __init__(
        self,
        port: int,
        group: str = "Plant1",
        node: str = "Line1",
        metrics: dict[str, tuple[DataType, Any]] | None = None,
        devices: dict[str, dict[str, tuple[DataType, Any]]] | None = None,
        bd_seq: int = 0,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.port, self.group, self.node = port, group, node
        self.credentials = credentials  # (username, password) for a broker that asks
        self.bd_seq = bd_seq - 1  # incremented by each connect
        self.answer_rebirth = True  # republish the births on a rebirth request
        self.rebirth_requests = 0  # NCMD Node Control/Rebirth = true received
        self.births = 0  # NBIRTHs published
        self.sent = 0  # messages published (births, data, deaths)
        self._seq = -1
        self._lock = threading.RLock()
        self.connected = threading.Event()
        aliases = iter(range(1, 1_000_000))
        start = now_ms()
        self.tags: dict[str | None, dict[str, Tag]] = {
            None: {n: Tag(dt, v, next(aliases), start) for n, (dt, v) in (metrics or {}).items()}
        }
        for device, device_metrics in (devices or {}).items():
            self.tags[device] = {
                n: Tag(dt, v, next(aliases), start) for n, (dt, v) in device_metrics.items()
            }
        self.client: paho.Client | None = None
        self._ready_mid: int | None = None

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"spBv1.0/{self.group}/{kind}/{self.node}"
        return base if device is None else f"{base}/{device}"

    def next_seq(self) -> int:
        with self._lock:
            self._seq = (self._seq + 1) % 256
            return self._seq

    def _bd_seq_metric(self) -> Metric:
        return Metric(timestamp=now_ms(), name="bdSeq", datatype=DataType.INT64, value=self.bd_seq)

    # --- connection ------------------------------------------------------------------------

    def connect(self, timeout: float = 20.0) -> None:
        """Connect with a will NDEATH for this session's bdSeq; the births follow at once."""
        self.bd_seq = (self.bd_seq + 1) % 256
        self.connected.clear()
        client = paho.Client(
            client_id=f"edge-{self.group}-{self.node}-{self.bd_seq}-{os.getpid()}",
            clean_session=True,
            reconnect_on_failure=False,
        )
        will = NDeath(timestamp=now_ms(), bd_seq_metric=self._bd_seq_metric())
        client.will_set(self.topic("NDEATH"), will.encode(), qos=1, retain=False)
        if self.credentials is not None:
            client.username_pw_set(*self.credentials)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.message_callback_add(self.topic("NCMD"), self._on_command)
        self.client = client
        client.connect("127.0.0.1", self.port, keepalive=5)
        client.loop_start()
        if not self.connected.wait(timeout):
            raise RuntimeError("the edge node could not connect")

    def _on_connect(self, client: paho.Client, _userdata: Any, _flags: Any, rc: int) -> None:
        if rc != 0:
            return
        client.subscribe(self.topic("NCMD"), qos=1)
        self.publish_births()
        # Then the host STATE (Sparkplug 3.0). Its SUBACK comes after the broker has taken
        # the births, so a host that subscribes after ``connect`` returns cannot get them.
        _, self._ready_mid = client.subscribe("spBv1.0/STATE/+", qos=1)

    def _on_subscribe(self, _client: paho.Client, _userdata: Any, mid: int, _qos: Any) -> None:
        if mid == self._ready_mid:
            self.connected.set()

    def _on_command(self, _client: paho.Client, _userdata: Any, message: Any) -> None:
        command = NCmd.decode(message.payload)
        for metric in command.metrics:
            if metric.name == "Node Control/Rebirth" and metric.value is True:
                self.rebirth_requests += 1
                if self.answer_rebirth:
                    self.publish_births()

    def publish_births(self) -> None:
        """NBIRTH (seq 0, every metric with alias, datatype and bdSeq), then each DBIRTH."""
        with self._lock:
            self._seq = -1
            node_metrics = (*self._metrics(None, birth=True), self._bd_seq_metric())
            birth = NBirth(timestamp=now_ms(), seq=self.next_seq(), metrics=node_metrics)
            self._publish(self.topic("NBIRTH"), birth.encode())
            self.births += 1
            for device in self.tags:
                if device is not None:
                    metrics = self._metrics(device, birth=True)
                    dbirth = DBirth(timestamp=now_ms(), seq=self.next_seq(), metrics=metrics)
                    self._publish(self.topic("DBIRTH", device), dbirth.encode())

    def _metrics(
        self, device: str | None, birth: bool, names: list[str] | None = None
    ) -> tuple[Metric, ...]:
        tags = self.tags[device]
        return tuple(
            Metric(
                timestamp=tag.timestamp,
                name=name if birth else None,  # DATA by alias only
                alias=tag.alias,
                datatype=tag.datatype,
                value=tag.value,
                is_null=tag.value is None,
            )
            for name, tag in tags.items()
            if names is None or name in names
        )

    def _publish(self, topic: str, data: bytes, qos: int = 0) -> None:
        assert self.client is not None
        self.client.publish(topic, data, qos=qos)
        self.sent += 1

    # --- the machine changes -------------------------------------------------------------------

    def set(self, device: str | None = None, timestamp: int | None = None, **values: Any) -> int:
        """Change metrics (``name=value``; names with spaces through ``set_metrics``) and send
        them as one NDATA/DDATA; returns the metrics' timestamp."""
        return self.set_metrics(values, device, timestamp)

    def set_metrics(
        self, values: dict[str, Any], device: str | None = None, timestamp: int | None = None
    ) -> int:
        stamp = timestamp if timestamp is not None else now_ms()
        with self._lock:
            for name, value in values.items():
                tag = self.tags[device][name]
                tag.value, tag.timestamp = value, stamp
            metrics = self._metrics(device, birth=False, names=list(values))
            kind = "NDATA" if device is None else "DDATA"
            cls = NData if device is None else DData
            payload = cls(timestamp=stamp, seq=self.next_seq(), metrics=metrics)
            self._publish(self.topic(kind, device), payload.encode())
        return stamp

    def skip_seq(self) -> None:
        """Lose one message: the next one's seq shows a gap."""
        self.next_seq()

    def send_raw(self, kind: str, data: bytes, device: str | None = None) -> None:
        """Publish bytes as they are (garbage, a stale NDEATH, a message out of session)."""
        self._publish(self.topic(kind, device), data)

    def death(self, bd_seq: int) -> bytes:
        """An NDEATH payload carrying ``bd_seq`` (to send as it is, e.g. a stale one)."""
        metric = Metric(timestamp=now_ms(), name="bdSeq", datatype=DataType.INT64, value=bd_seq)
        return NDeath(timestamp=now_ms(), bd_seq_metric=metric).encode()

    def device_death(self, device: str) -> None:
        with self._lock:
            payload = DDeath(timestamp=now_ms(), seq=self.next_seq())
            self._publish(self.topic("DDEATH", device), payload.encode())

    def drop(self) -> None:
        """Vanish without a DISCONNECT (power cut, cable pulled): the broker sends the will."""
        client, self.client = self.client, None
        if client is None:
            return
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        client.loop_stop()
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Disconnect cleanly (no will, no NDEATH): for the end of a test."""
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["broker"]:
        rest = sys.argv[3:]
        passwords = None
        if rest[:1] == ["--passwords"]:
            passwords, rest = rest[1], rest[2:]
        asyncio.run(_serve_broker(int(sys.argv[2]), rest, passwords))
