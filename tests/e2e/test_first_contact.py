"""What a new user hits in the first hour (issue 10, "first contact"), each as a worked example
that failed before its fix."""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path

from typer.testing import CliRunner

from hub.cli import app
from hub.cli.serve import ADMIN_KEY_FILE, _api_keys_or_generated
from hub.nats import USUAL_PORT, usual_port_if_free
from hub.settings import load_settings


def test_the_config_option_s_help_names_the_hub_section() -> None:
    # Rich read "[hub]" as markup and printed "settings under ".
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "settings under [hub]" in result.output


def test_a_misspelled_data_dir_is_refused_not_made_into_an_empty_store(tmp_path: Path) -> None:
    wrong = tmp_path / "mes-hbu"
    for command in (["projections", "status"], ["projections", "catch-up"],
                    ["nats", "credentials"]):  # fmt: skip
        result = CliRunner().invoke(app, [*command, "--data-dir", str(wrong)])
        assert result.exit_code == 2, (command, result.output)
        assert str(wrong) in result.output.replace("\n", "")
    assert not wrong.exists()


def test_the_generated_admin_key_is_kept_across_restarts(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "hub")
    first = _api_keys_or_generated(settings)[1]
    again = _api_keys_or_generated(settings)[1]
    assert first is not None and first == again
    kept = settings.data_dir / ADMIN_KEY_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    # Configured keys win, and nothing is generated then.
    configured = load_settings(data_dir=tmp_path / "hub", api_keys="admin:0123456789abcdef01")
    assert _api_keys_or_generated(configured)[1] is None


def test_the_embedded_nats_takes_the_usual_port_when_it_is_free() -> None:
    with socket.socket() as listener:
        try:
            listener.bind(("127.0.0.1", USUAL_PORT))
        except OSError:  # something else holds it on this machine: then it is not free
            assert usual_port_if_free() == -1
            return
        listener.listen()
        assert usual_port_if_free() == -1  # taken: nats-server picks a free one
    assert usual_port_if_free() == USUAL_PORT


def test_with_the_usual_port_taken_the_embedded_nats_keeps_the_port_it_had_before() -> None:
    with socket.socket() as usual, socket.socket() as other:
        # (Something else may hold it on this machine: taken all the same.)
        with contextlib.suppress(OSError):
            usual.bind(("127.0.0.1", USUAL_PORT))
        other.bind(("127.0.0.1", 0))
        last = other.getsockname()[1]
        other.close()  # free again: the port the hub had the last time
        assert usual_port_if_free(last=last) == last
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", last))
            assert usual_port_if_free(last=last) == -1  # both taken: a free one


def test_an_adapter_with_nats_down_says_so_once_and_stops_on_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    simulator = subprocess.Popen(
        [sys.executable, "-m", "hub", "adapter", "run", "simulator",
         "--nats-url", f"nats://127.0.0.1:{port}", "--max-events", "10"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(3)  # some six failed attempts
    simulator.send_signal(signal.SIGTERM)
    _, stderr = simulator.communicate(timeout=10)
    assert simulator.returncode == 0
    said = stderr.decode()
    assert "Traceback" not in said
    assert said.count("Connect call failed") == 1, said
