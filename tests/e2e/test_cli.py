"""The CLI as a user runs it: real processes, real ports."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from contracts import EVENT_TYPES, PARTNER_EVENT_TYPES
from hub.bootstrap import Hub, build_hub
from hub.cli import app
from hub.nats import MSG_ID_HEADER, EmbeddedNatsServer, connect, ensure_streams
from hub.settings import load_settings
from tests.conftest import eventually

MES_HUB = [sys.executable, "-m", "hub"]


def test_contracts_export_writes_one_schema_per_type(tmp_path: Path) -> None:
    result = subprocess.run([*MES_HUB, "contracts", "export", str(tmp_path)], capture_output=True)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "mes.machine.partcount.v1.schema.json" in names
    assert len(names) == len(EVENT_TYPES) + len(PARTNER_EVENT_TYPES)
    assert "mes.hub.delivery_forecast.changed.v1.schema.json" in names
    assert "mes.order.confirmed.v1.schema.json" in names  # what partners are told


def test_a_bad_config_file_fails_at_start_with_file_key_and_reason(tmp_path: Path) -> None:
    config = tmp_path / "mes-hub.toml"
    config.write_text('[hub]\nstore = "oracle"\n')
    result = subprocess.run(
        [*MES_HUB, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert str(config) in result.stderr and "hub.store" in result.stderr
    assert "'sqlite' or 'postgres'" in result.stderr


def test_demo_runs_the_factory_and_exits_with_a_summary(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *MES_HUB,
            "demo",
            "--machines",
            "4",
            "--speed",
            "3000",
            "--duration",
            "6",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = re.search(
        r"(\d+) events published, (\d+) stored exactly once \(with (\d+) delivery forecast",
        " ".join(result.stdout.split()),
    )
    assert summary is not None, result.stdout[-2000:]
    published, stored, forecasts = map(int, summary.groups())
    confirmed = re.search(
        r"(\d+) production confirmations taken by the simulated ERP",
        " ".join(result.stdout.split()),
    )
    assert confirmed is not None, result.stdout[-2000:]
    taken = int(confirmed.group(1))
    # Stored: what was published, the hub's forecasts, and per confirmation the decision and
    # at least one attempt (more if the demo stopped between the two).
    assert published > 100 and taken > 0
    assert stored >= published + forecasts + 2 * taken
    assert "M0004" in result.stdout and "admin key" in result.stdout
    # The partners' webhooks reached the local receiver, every signature checking out.
    told = re.search(
        r"(\d+) partner webhooks taken by the local receiver, each signature checked "
        r"\((.*?); (\d+) refused\)",
        " ".join(result.stdout.split()),
    )
    assert told is not None, result.stdout[-2000:]
    assert int(told.group(1)) > 0 and int(told.group(3)) == 0
    assert "started" in told.group(2)
    # The log was sealed and signed as it ran, and says how to prove it.
    sealed = re.search(r"sealed and signed up to its first (\d+) events", result.stdout)
    assert sealed is not None and int(sealed.group(1)) > 0, result.stdout[-2000:]
    verified = subprocess.run(
        [*MES_HUB, "audit", "verify", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0 and "verify OK" in verified.stdout, verified.stderr[-2000:]


async def test_an_event_from_outside_code_appears_in_the_served_api(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "nats") as nats_server:
        key = "admin:e2e-0123456789abcdef"
        port_file = tmp_path / "out.txt"
        process = subprocess.Popen(
            [
                *MES_HUB,
                "serve",
                "--nats-url",
                nats_server.url,
                "--data-dir",
                str(tmp_path / "hub"),
                "--port",
                "0",
            ],
            env={**os.environ, "MES_HUB_API_KEYS": key, "COLUMNS": "200"},
            stdout=port_file.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            await eventually(lambda: "API on" in port_file.read_text(), timeout=60)
            url = re.search(r"API on (http://\S+)", port_file.read_text())
            assert url is not None
            # Outside code: its own NATS client, plain JSON, the contract's subject.
            client = await connect(nats_server.url)
            await ensure_streams(client.jetstream(), load_settings())
            event = {
                "specversion": "1.0",
                "id": "plc-gw-1",
                "source": "urn:plc-gateway",
                "type": "mes.machine.availability.v1",
                "time": "2026-03-02T06:00:00Z",
                "subject": "PRESS-2",
                "data": {"availability": "AVAILABLE"},
            }
            await client.jetstream().publish(
                "mes.default.machine.PRESS-2.availability",
                json.dumps(event).encode(),
                headers={MSG_ID_HEADER: "plc-gw-1"},
            )
            await client.close()
            headers = {"Authorization": "Bearer e2e-0123456789abcdef"}
            async with httpx.AsyncClient(base_url=url.group(1)) as http:

                async def visible() -> bool:
                    response = await http.get("/api/v1/machines/PRESS-2", headers=headers)
                    return response.status_code == 200

                await eventually(visible)
                body = (await http.get("/api/v1/machines/PRESS-2", headers=headers)).json()
                assert body["availability"] == "AVAILABLE"
        finally:
            process.terminate()
            assert process.wait(30) == 0


def test_demo_on_ctrl_c_prints_the_summary_and_exits_zero(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "demo.out"
    process = subprocess.Popen(
        [
            *MES_HUB,
            "demo",
            "--machines",
            "2",
            "--speed",
            "600",
            "--duration",
            "0",
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "160"},
    )
    deadline = time.monotonic() + 60
    while "operator station" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)
    try:
        # The board's one-time link, printed by the demo, shows the simulated factory.
        printed = " ".join(out.read_text().split())
        link = re.search(r"plant board \(opens signed in as a viewer, once\): (\S+)", printed)
        assert link is not None, printed
        station = re.search(r"M0001's operator station \(as an operator, once\): (\S+)", printed)
        assert station is not None and "next=/ui/station/M0001" in station[1]
        with httpx.Client() as browser:
            asked = browser.get(link[1])
            assert asked.status_code == 200 and "Sign in as viewer" in asked.text
            board = browser.post(
                link[1].split("?")[0], data={"next": "/ui/"}, follow_redirects=True
            )
            assert board.status_code == 200 and "Plant board" in board.text
            for machine in ("M0001", "M0002"):
                assert f'data-machine="{machine}"' in board.text
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert re.search(r"\d+ events published, \d+ stored exactly once", out.read_text())


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_serve_on_a_taken_port_exits_with_a_clear_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    with taken_port() as port:
        result = subprocess.run(
            [*MES_HUB, "serve", "--port", str(port), "--data-dir", str(data_dir)],
            env={**os.environ, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    error = " ".join(result.stderr.split())
    assert result.returncode == 1, error
    assert f"cannot serve the API on 127.0.0.1:{port}: Address already in use" in error, error
    assert "Traceback" not in error
    assert (data_dir / "nats").is_dir()  # the hub, with its embedded nats-server, was up
    left = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if any(str(data_dir) in arg for arg in p.info["cmdline"] or ())
    ]
    assert left == []


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_hub_whose_api_cannot_listen_is_closed(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process, so that the hub's nats-server is this process's child: closed, not left to
    die with its parent."""
    built: list[Hub] = []
    closed: list[Hub] = []

    async def recording_build_hub(*args: Any, **kwargs: Any) -> Hub:
        hub = await build_hub(*args, **kwargs)
        built.append(hub)
        close = hub.close

        async def recording_close() -> None:
            await close()
            closed.append(hub)

        hub.close = recording_close  # type: ignore[method-assign]
        return hub

    monkeypatch.setattr(f"hub.cli.{command}.build_hub", recording_build_hub)
    monkeypatch.setattr(f"hub.cli.{command}.setup_logging", lambda *args, **kwargs: None)
    data_dir = tmp_path / "hub"
    with taken_port() as port:
        result = CliRunner().invoke(
            app, [command, "--port", str(port), "--data-dir", str(data_dir)], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 1, result.output
    assert "Address already in use" in " ".join(result.stderr.split())
    assert (len(built), len(closed)) == (1, 1)  # the one hub built, closed
    children = psutil.Process().children(recursive=True)
    assert not [c for c in children if any(str(data_dir) in arg for arg in c.cmdline())]


# --- docs/adapters.md: the SHDR `keys` (issue 10) ------------------------------------------------

ADAPTERS_DOC = Path(__file__).resolve().parents[2] / "docs" / "adapters.md"
SHDR_KEYS_HEADING = "### `keys`: what each SHDR key means"


def shdr_keys_section() -> list[str]:
    """The lines of the SHDR ``keys`` section of docs/adapters.md, up to the next heading (a
    ``#`` inside a code block is a comment, not a heading)."""
    lines = ADAPTERS_DOC.read_text().splitlines()
    start = lines.index(SHDR_KEYS_HEADING)
    section, fenced = [], False
    for line in lines[start + 1 :]:
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            break
        section.append(line)
    return section


def documented_targets() -> list[str]:
    return [m.group(1) for line in shdr_keys_section() if (m := re.match(r"\| `(\w+)` \|", line))]


def documented_okuma_keys() -> str:
    """The section's TOML example (the one with ``[adapters.shdr.keys]``)."""
    blocks = "\n".join(shdr_keys_section()).split("```")
    (example,) = [b for b in blocks[1::2] if "[adapters.shdr.keys]" in b]
    return example.removeprefix("toml\n")


def test_the_documented_shdr_key_targets_are_the_ones_the_adapter_takes(tmp_path: Path) -> None:
    """The docs list every target once, and exactly those the config accepts: the code's set,
    and the set the configuration error names (the docs cannot drift from either)."""
    from typing import get_args

    from adapters.machines.observations import Meaning

    documented = documented_targets()
    assert len(documented) == len(set(documented)), documented
    assert set(documented) == set(get_args(Meaning))
    config = tmp_path / "mes-hub.toml"
    config.write_text('[[adapters.shdr]]\nhost = "x"\nmachine_id = "M1"\nkeys = { avail = "on" }\n')
    result = subprocess.run(
        [*MES_HUB, "adapter", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    error = " ".join(result.stderr.split())
    assert result.returncode == 2 and "adapters.shdr.0.keys.avail" in error, error
    named = re.findall(r"'(\w+)'", error.split("Input should be", 1)[1])
    assert set(named) == set(documented), error


def test_the_documented_okuma_keys_read_the_capture_as_its_devices_xml_does(
    tmp_path: Path,
) -> None:
    from adapters.machines.config import load_adapters
    from adapters.machines.shdr import ShdrParser
    from tests.integration.test_shdr_adapter import MTCONNECT, okuma

    capture = MTCONNECT / "demo_agent_okuma_shdr.txt"
    if not capture.is_file():
        pytest.skip("../shared/fixtures/mtconnect (the real Okuma SHDR capture) is not here")
    config = tmp_path / "mes-hub.toml"
    config.write_text(documented_okuma_keys())
    (documented,) = load_adapters(config).shdr
    assert documented.devices_xml is None
    device_model = documented.model_copy(update={"keys": {}, **okuma()})
    lines = capture.read_text().splitlines()
    by_keys, by_xml = ShdrParser(documented), ShdrParser(device_model)
    events = [e.model_dump() for line in lines for e in by_keys.feed(line)]
    assert events == [e.model_dump() for line in lines for e in by_xml.feed(line)]
    assert {e["type"] for e in events} >= {
        "mes.machine.availability.v1", "mes.machine.execution.v1", "mes.machine.partcount.v1",
    }  # fmt: skip
    # Every key of the example occurs in the capture, and maps as Devices.xml maps it.
    assert by_keys.keys == {k: v for k, v in by_xml.keys.items() if k in by_keys.keys}
    assert all(f"|{key}|" in capture.read_text() for key in by_keys.keys)


def test_serve_with_the_wrong_store_key_exits_naming_the_setting_not_the_key(
    tmp_path: Path,
) -> None:
    from eventsourcing.cryptography import AESCipher

    from hub.settings import load_settings
    from hub.store import EventStore

    data_dir = tmp_path / "hub"
    right, wrong = AESCipher.create_key(32), AESCipher.create_key(32)
    EventStore(load_settings(data_dir=data_dir, store_encryption_key=right)).close()
    result = subprocess.run(
        [*MES_HUB, "serve", "--port", "0", "--data-dir", str(data_dir)],
        env={**os.environ, "COLUMNS": "200", "MES_HUB_STORE_ENCRYPTION_KEY": wrong},
        capture_output=True,
        text=True,
        timeout=60,
    )
    error = " ".join(result.stderr.split())
    assert result.returncode == 2, error
    assert "store_encryption_key" in error and "Traceback" not in error, error
    assert right not in result.stderr + result.stdout and wrong not in result.stderr + result.stdout
