"""A PostgreSQL store that does not answer, or refuses the hub, is said within seconds in one
line: where (host and port, or socket) and why, never the password and no traceback; at start
(``serve``, ``demo``, the ``projections`` commands and the views process) and when the server
goes away while the hub runs (issue 10, item 5)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import SecretStr

from hub.settings import Settings, load_settings, settings_json
from hub.store import EventStore, StoreUnavailable
from projections.views.database import PostgresViews
from tests.conftest import postgres_settings

# Distinctive, so that finding it anywhere in the output is no accident.
PASSWORD = "Pw-do-not-print-4711"
# A bound, not a measurement: the point is seconds, not the pool's 30 s and its retries.
PROMPTLY_S = 20


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def dsn_at(host: str, port: int | str, **params: str) -> str:
    query = "".join(f"&{key}={value}" for key, value in params.items())
    return f"postgresql://mes:{PASSWORD}@{host}:{port}/mes?application_name=test{query}"


def settings_for(dsn: str, data_dir: Path) -> Settings:
    return load_settings(data_dir=data_dir, store="postgres", postgres_dsn=SecretStr(dsn))


def refusal(dsn: str, data_dir: Path) -> str:
    """What the store says when it cannot connect (and that it says so promptly)."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        EventStore(settings_for(dsn, data_dir))
    assert time.monotonic() - started < PROMPTLY_S
    message = str(caught.value)
    assert PASSWORD not in message
    assert "\n" not in message
    return message


@contextlib.contextmanager
def fake_server(answer: bytes | None) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that declines TLS and GSS encryption ("N") and then sends
    ``answer`` to the startup message; ``None``: it accepts and never says anything."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)
            if answer is None:
                continue
            with contextlib.suppress(OSError):
                while len(head := connection.recv(8)) == 8:
                    length, code = struct.unpack("!ii", head)
                    if length > 8:
                        connection.recv(length - 8)
                    if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                        connection.sendall(b"N")
                        continue
                    connection.sendall(answer)
                    break
            connection.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for connection in held:
            connection.close()


def fatal(message: str) -> bytes:
    """A PostgreSQL ErrorResponse, as a server refusing a connection sends it."""
    fields = b"SFATAL\0VFATAL\0C28000\0M" + message.encode() + b"\0\0"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


# --- at start: the causes --------------------------------------------------------------------


def test_a_closed_port_is_connection_refused(tmp_path: Path) -> None:
    port = closed_port()
    assert refusal(dsn_at("127.0.0.1", port), tmp_path) == (
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused"
    )


def test_a_host_name_that_does_not_resolve_is_said_so(tmp_path: Path) -> None:
    message = refusal(dsn_at("nonexistent.invalid", 5433), tmp_path)
    assert message.startswith(
        "cannot connect to PostgreSQL at nonexistent.invalid:5433: host name not resolved"
    )


def test_a_server_that_never_answers_times_out_within_the_connect_timeout(
    tmp_path: Path,
) -> None:
    with fake_server(None) as port:
        message = refusal(dsn_at("127.0.0.1", port, connect_timeout="2"), tmp_path)
    assert message == (
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}: no answer within 2 s (timeout)"
    )


def test_tls_asked_for_and_tls_required_are_told_apart(tmp_path: Path) -> None:
    with fake_server(fatal("never reached")) as port:
        message = refusal(dsn_at("127.0.0.1", port, sslmode="require"), tmp_path)
    assert message == (
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}: the server does not offer TLS, "
        "but postgres_dsn's sslmode requires it"
    )
    entry = 'no pg_hba.conf entry for host "127.0.0.1", user "mes", database "mes", no encryption'
    with fake_server(fatal(entry)) as port:
        message = refusal(dsn_at("127.0.0.1", port, sslmode="disable"), tmp_path)
    assert message.startswith(f"cannot connect to PostgreSQL at 127.0.0.1:{port}: refused without")
    assert "set sslmode=require or verify-full in postgres_dsn" in message


def test_each_host_of_a_list_is_named_with_its_own_cause(tmp_path: Path) -> None:
    port = closed_port()
    dsn = f"postgresql://mes:{PASSWORD}@127.0.0.1:{port},nonexistent.invalid:5433/mes"
    message = refusal(dsn, tmp_path)
    assert message.startswith(
        f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused; "
        "at nonexistent.invalid:5433: host name not resolved"
    )


def test_the_views_say_so_too(tmp_path: Path) -> None:
    port = closed_port()
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}: connection refused"):
        PostgresViews(dsn_at("127.0.0.1", port), "public")


def _socket_place(dsn: str) -> tuple[str, str]:
    """(host, port) of the test server as a message names them."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    return params.get("host", "localhost"), params.get("port", "5432")


@pytest.mark.postgres
def test_a_database_that_does_not_exist_is_named(postgres_dsn: str, tmp_path: Path) -> None:
    dsn = make_conninfo(postgres_dsn, dbname="no_such_db", password=PASSWORD)
    message = refusal(dsn, tmp_path)
    host, port = _socket_place(postgres_dsn)
    assert host in message and port in message
    assert message.endswith('database "no_such_db" does not exist')


@pytest.fixture
def password_checked_role(postgres_dsn: str) -> Iterator[str]:
    """A role whose password the server checks. The embedded test server trusts local
    connections: for this role only, its pg_hba.conf asks for the password while the test runs."""
    role = "mes_pw_" + uuid.uuid4().hex[:8]
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'the-right-one-0123'")
        hba = Path(str(admin.execute("SHOW hba_file").fetchone()[0]))  # type: ignore[index]
    wrong = make_conninfo(postgres_dsn, user=role, password=PASSWORD, connect_timeout=3)

    def refused() -> bool:
        try:
            psycopg.connect(wrong).close()
        except psycopg.OperationalError:
            return True
        return False

    original = None
    try:
        if not refused():
            if not os.access(hba, os.W_OK):
                pytest.skip("the test server lets any password in and its pg_hba.conf is not ours")
            original = hba.read_text()
            hba.write_text(
                f"local all {role} scram-sha-256\nhost all {role} all scram-sha-256\n{original}"
            )
            with psycopg.connect(postgres_dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + 10
            while not refused():  # the server reloads in the background
                assert time.monotonic() < deadline, "pg_hba.conf not reloaded"
                time.sleep(0.05)
        yield role
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True) as admin:
            if original is not None:
                hba.write_text(original)
                admin.execute("SELECT pg_reload_conf()")
            admin.execute(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_a_wrong_password_is_authentication_failed_without_the_password(
    postgres_dsn: str, password_checked_role: str, tmp_path: Path
) -> None:
    dsn = make_conninfo(postgres_dsn, user=password_checked_role, password=PASSWORD)
    message = refusal(dsn, tmp_path)
    host, port = _socket_place(postgres_dsn)
    assert host in message and port in message
    assert message.endswith(f'password authentication failed for user "{password_checked_role}"')


# --- at start: the commands ------------------------------------------------------------------


def run_cli(
    args: list[str], dsn: str | None, cwd: Path, stdin: bytes | None = None
) -> tuple[int, str, float]:
    """``mes-hub <args>`` with the store at ``dsn`` (None: as its input says): exit code,
    stderr and seconds taken."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MES_HUB_")}
    env["COLUMNS"] = "80"  # (a one-line message must not be wrapped)
    if dsn is not None:
        env |= {"MES_HUB_STORE": "postgres", "MES_HUB_POSTGRES_DSN": dsn}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hub", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=120,
    )
    return done.returncode, done.stderr.decode(), time.monotonic() - started


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--port", "0"],
        ["demo", "--duration", "1", "--machines", "1"],
        ["projections", "status"],
        ["projections", "rebuild"],
        ["projections", "catch-up"],
        ["projections", "follow"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_every_command_says_where_and_why_in_one_line_and_exits(
    command: list[str], tmp_path: Path
) -> None:
    port = closed_port()
    dsn = dsn_at("127.0.0.1", port)
    code, stderr, seconds = run_cli([*command, "--data-dir", str(tmp_path / "hub")], dsn, tmp_path)
    assert code == 1, stderr
    assert f"error: cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused" in (
        stderr.splitlines()
    ), stderr
    assert "Traceback" not in stderr
    assert PASSWORD not in stderr
    assert seconds < PROMPTLY_S


def test_the_views_process_started_by_a_hub_says_so_in_one_line(tmp_path: Path) -> None:
    settings = settings_for(dsn_at("nonexistent.invalid", 5433), tmp_path / "hub")
    # As hub.children starts it: its settings as the first line of its input.
    code, stderr, _ = run_cli(
        ["projections", "follow", "--settings-from-stdin"],
        None,
        tmp_path,
        stdin=settings_json(settings) + b"\n",
    )
    assert code == 1, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "cannot connect to PostgreSQL at nonexistent.invalid:5433: host name not resolved" in (
        stderr
    )
    assert PASSWORD not in stderr


@pytest.mark.postgres
def test_projections_status_names_a_database_that_does_not_exist(
    postgres_dsn: str, tmp_path: Path
) -> None:
    dsn = make_conninfo(postgres_dsn, dbname="no_such_db", password=PASSWORD)
    code, stderr, seconds = run_cli(["projections", "status"], dsn, tmp_path)
    assert code == 1, stderr
    assert 'database "no_such_db" does not exist' in stderr
    assert "Traceback" not in stderr and PASSWORD not in stderr
    assert seconds < PROMPTLY_S


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        (f"postgresql://mes:{PASSWORD}@db:abc/mes", "the port must be a number"),
        (f"postgresql://mes:{PASSWORD}@db/mes?sslmode=sometimes", "sslmode must be one of"),
    ],
)
def test_a_dsn_the_driver_would_refuse_is_a_configuration_error_at_start(
    dsn: str, reason: str, tmp_path: Path
) -> None:
    code, stderr, _ = run_cli(["serve", "--data-dir", str(tmp_path / "hub")], dsn, tmp_path)
    assert code == 2, stderr
    assert "MES_HUB_POSTGRES_DSN" in stderr and reason in " ".join(stderr.split())
    assert "Traceback" not in stderr and PASSWORD not in stderr


# --- while running: the server goes away -----------------------------------------------------


class CuttableProxy:
    """A TCP port on 127.0.0.1 forwarding to the test server, until ``cut``: then it refuses
    new connections and drops those it carried, as a server that went away."""

    def __init__(self, dsn: str) -> None:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
        host, port = params.get("host", "localhost"), params.get("port", "5432")
        self._unix = host.startswith("/")
        self._target: str | tuple[str, int] = (
            f"{host}/.s.PGSQL.{port}" if self._unix else (host, int(port))
        )
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = int(self._listener.getsockname()[1])
        self._carried: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX if self._unix else socket.AF_INET)
            server.connect(self._target)
            self._carried += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for carried in self._carried:
            with contextlib.suppress(OSError):
                carried.shutdown(socket.SHUT_RDWR)
            carried.close()


@pytest.mark.postgres
def test_a_server_that_goes_away_is_said_in_one_line_within_seconds(
    postgres_dsn: str, tmp_path: Path
) -> None:
    proxy = CuttableProxy(postgres_dsn)
    via_proxy = make_conninfo(postgres_dsn, host="127.0.0.1", port=proxy.port, password=PASSWORD)
    settings = postgres_settings(via_proxy, tmp_path / "hub")
    store = EventStore(settings)
    assert settings.postgres_dsn is not None
    views = PostgresViews(settings.postgres_dsn.get_secret_value(), settings.postgres_schema)
    try:
        assert store.last_position() == 0
        proxy.cut()
        expected = f"cannot connect to PostgreSQL at 127.0.0.1:{proxy.port}: connection refused"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            store.last_position()
        assert str(caught.value) == expected
        assert time.monotonic() - started < PROMPTLY_S
        with pytest.raises(StoreUnavailable, match=expected), views.transaction() as cursor:
            cursor.execute("SELECT 1")
    finally:
        views.close()
        store.close()


def test_a_service_s_failure_for_want_of_the_store_is_logged_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from hub.cli.shared import setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging(logging.INFO)
    try:
        try:
            raise StoreUnavailable("cannot connect to PostgreSQL at db:5432: connection refused")
        except StoreUnavailable:
            logging.getLogger("hub.ingest").exception("ingest partition 0 failed; resuming")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    said = capsys.readouterr().err
    assert said.count("\n") == 1, said
    assert said.rstrip().endswith(
        "ingest partition 0 failed; resuming: cannot connect to PostgreSQL at db:5432: "
        "connection refused"
    )
    assert "Traceback" not in said
