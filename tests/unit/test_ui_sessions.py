"""The screens' signed-in devices (hub.ui.sessions), with a clock the tests move."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hub.ui.sessions import Sessions

KEYS = {"key-aaaa": "operator", "key-bbbb": "viewer"}


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 30, 6, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def sessions_at(path: Path, clock: Clock, keys: dict = KEYS) -> Sessions:
    return Sessions(path, keys, idle_s=3600, lifetime_s=8 * 3600, link_valid_s=600, clock=clock)


def test_the_file_and_its_journal_are_private(tmp_path: Path) -> None:
    sessions = sessions_at(tmp_path / "s.sqlite", Clock())
    sessions.sign_in("key-aaaa", "operator", "tablet")
    for name in ("s.sqlite", "s.sqlite-wal", "s.sqlite-shm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_the_file_keeps_no_token(tmp_path: Path) -> None:
    opened = sessions_at(tmp_path / "s.sqlite", Clock()).sign_in("key-aaaa", "operator", "t")
    for name in ("s.sqlite", "s.sqlite-wal"):
        assert opened.token.encode() not in (tmp_path / name).read_bytes()


def test_a_session_unused_for_an_hour_or_older_than_a_shift_is_over(tmp_path: Path) -> None:
    clock = Clock()
    sessions = sessions_at(tmp_path / "s.sqlite", clock)
    token = sessions.sign_in("key-aaaa", "operator", "tablet").token
    for _ in range(8):  # used every 59 minutes: kept, until 8 hours from signing in
        clock.now += timedelta(minutes=59)
        assert sessions.find(token) is not None
    clock.now += timedelta(minutes=9)  # 8 h 01 min after signing in, used 9 min ago
    assert sessions.find(token) is None
    idle = sessions.sign_in("key-bbbb", "viewer", "wall").token
    clock.now += timedelta(minutes=61)
    assert sessions.find(idle) is None


def test_starting_sweeps_what_is_over_and_what_was_revoked(tmp_path: Path) -> None:
    clock = Clock()
    sessions = sessions_at(tmp_path / "s.sqlite", clock)
    sessions.sign_in("key-aaaa", "operator", "tablet")
    sessions.sign_in("key-bbbb", "viewer", "wall")
    sessions.issue_link("key-aaaa", "operator")
    clock.now += timedelta(minutes=30)
    kept = sessions.sign_in("key-aaaa", "operator", "tablet 2").token
    clock.now += timedelta(minutes=40)  # the first two are unused for 70 min, the link expired
    restarted = sessions_at(tmp_path / "s.sqlite", clock, {"key-aaaa": "operator"})
    assert restarted.forget_revoked() == 3
    assert [s.device for s in restarted.listed()] == ["tablet 2"]
    assert restarted.find(kept) is not None


def test_a_link_is_used_once_and_looking_at_it_uses_nothing(tmp_path: Path) -> None:
    clock = Clock()
    sessions = sessions_at(tmp_path / "s.sqlite", clock)
    link = sessions.issue_link("key-bbbb", "viewer")
    assert sessions.link_role(link) == sessions.link_role(link) == "viewer"
    opened = sessions.redeem_link(link, "wall")
    assert opened is not None and opened.session.role == "viewer"
    assert sessions.redeem_link(link, "scanner") is None
    late = sessions.issue_link("key-bbbb", "viewer")
    clock.now += timedelta(minutes=11)
    assert sessions.link_role(late) is None and sessions.redeem_link(late, "wall") is None
