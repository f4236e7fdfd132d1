"""Signed-in devices of the floor's screens: a tablet at a machine, a wall screen, a manager's
laptop. A device signs in once with an API key and keeps a session cookie; the key itself is
never stored by the browser.

- The cookie holds a random token; the hub keeps only its SHA-256 (a stolen sessions file
  signs nobody in), with the key's id and role, the device's user agent, and a CSRF token the
  pages send back with every request that changes something.
- A session ends when its holder signs out, an admin ends it, it has not been used for
  ``idle_s`` or is older than ``lifetime_s``, or its key is no longer configured (a revoked
  key: checked at every use, and the hub removes such sessions when it starts).
- A one-time sign-in link (``mes-hub demo`` prints two) is a token that opens one session and
  is then gone; it expires after ``link_valid_s``.

Kept in ``<data dir>/ui-sessions.sqlite``: a few rows, written at sign-in and at most once a
minute per session after that. Blocking: the pages call it off the event loop."""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hub.settings import ROLES, Role

SESSIONS_FILE = "ui-sessions.sqlite"
# How often a session's last use is written down (not at every request of a live page).
TOUCH_EVERY = timedelta(seconds=60)


@dataclass(frozen=True)
class Session:
    """A signed-in device. ``id``: what the admin page shows and ends it by (a prefix of the
    token's hash, never the token)."""

    id: str
    key_id: str
    role: Role
    csrf: str
    device: str
    created: datetime
    last_seen: datetime


@dataclass(frozen=True)
class Opened:
    """A new session and the token its cookie carries (given to the device once)."""

    session: Session
    token: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _utc(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)


def _micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


class Sessions:
    """The sessions of one hub (see the module). ``known_keys``: the ids of the keys configured
    now, with their roles; a session of any other key is over."""

    def __init__(
        self,
        path: Path,
        known_keys: dict[str, Role],
        *,
        idle_s: float = 7 * 86_400,
        lifetime_s: float = 90 * 86_400,
        link_valid_s: float = 86_400,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.path = path
        self.known_keys = dict(known_keys)
        self.idle = timedelta(seconds=idle_s)
        self.lifetime = timedelta(seconds=lifetime_s)
        self.link_valid = timedelta(seconds=link_valid_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Made private before SQLite opens it: its -wal and -shm files take its mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            self.path.chmod(0o600)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(
                "CREATE TABLE IF NOT EXISTS ui_sessions (hash TEXT PRIMARY KEY, key_id TEXT NOT "
                "NULL, role TEXT NOT NULL, csrf TEXT NOT NULL, device TEXT NOT NULL, created "
                "INTEGER NOT NULL, last_seen INTEGER NOT NULL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS ui_links (hash TEXT PRIMARY KEY, key_id TEXT NOT "
                "NULL, role TEXT NOT NULL, expires INTEGER NOT NULL)"
            )
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- signing in -------------------------------------------------------------------------

    def sign_in(self, key_id: str, role: Role, device: str) -> Opened:
        """A new session for the holder of key ``key_id``."""
        token, now = secrets.token_urlsafe(32), self._clock()
        csrf = secrets.token_urlsafe(32)
        device = device[:200]
        with self._lock:
            self._open().execute(
                "INSERT INTO ui_sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_hash(token), key_id, role, csrf, device, _micros(now), _micros(now)),
            )
        session = Session(_hash(token)[:16], key_id, role, csrf, device, now, now)
        return Opened(session, token)

    def issue_link(self, key_id: str, role: Role) -> str:
        """A one-time sign-in token for key ``key_id``'s role (valid ``link_valid_s``)."""
        token = secrets.token_urlsafe(32)
        expires = self._clock() + self.link_valid
        with self._lock:
            self._open().execute(
                "INSERT INTO ui_links VALUES (?, ?, ?, ?)",
                (_hash(token), key_id, role, _micros(expires)),
            )
        return token

    def link_role(self, token: str) -> Role | None:
        """The role a one-time link would sign in as, without using it (None: no such link)."""
        with self._lock:
            row = (
                self._open()
                .execute(
                    "SELECT key_id, role, expires FROM ui_links WHERE hash = ?", (_hash(token),)
                )
                .fetchone()
            )
        if row is None:
            return None
        key_id, role, expires = row
        if _utc(expires) <= self._clock() or self.known_keys.get(key_id) != role:
            return None
        found: Role = role
        return found

    def redeem_link(self, token: str, device: str) -> Opened | None:
        """The session a one-time link opens, or None (unknown, used, expired, key revoked)."""
        with self._lock:
            db = self._open()
            row = db.execute(
                "DELETE FROM ui_links WHERE hash = ? RETURNING key_id, role, expires",
                (_hash(token),),
            ).fetchone()
        if row is None:
            return None
        key_id, role, expires = row
        if _utc(expires) <= self._clock() or self.known_keys.get(key_id) != role:
            return None
        return self.sign_in(key_id, role, device)

    # --- using a session --------------------------------------------------------------------

    def find(self, token: str) -> Session | None:
        """The live session of the cookie's ``token``, or None. Ends it if it is over."""
        now = self._clock()
        digest = _hash(token)
        with self._lock:
            db = self._open()
            row = db.execute(
                "SELECT key_id, role, csrf, device, created, last_seen FROM ui_sessions "
                "WHERE hash = ?",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            key_id, role, csrf, device, created, last_seen = row
            created_at, seen_at = _utc(created), _utc(last_seen)
            over = (
                now - seen_at > self.idle
                or now - created_at > self.lifetime
                or self.known_keys.get(key_id) != role
                or role not in ROLES
            )
            if over:
                db.execute("DELETE FROM ui_sessions WHERE hash = ?", (digest,))
                return None
            if now - seen_at > TOUCH_EVERY:
                db.execute(
                    "UPDATE ui_sessions SET last_seen = ? WHERE hash = ?", (_micros(now), digest)
                )
                seen_at = now
        return Session(digest[:16], key_id, role, csrf, device, created_at, seen_at)

    def end(self, token: str) -> None:
        """Sign out the session of ``token``."""
        with self._lock:
            self._open().execute("DELETE FROM ui_sessions WHERE hash = ?", (_hash(token),))

    def end_by_id(self, session_id: str) -> bool:
        """End the session the admin page shows as ``session_id``; whether there was one."""
        if len(session_id) != 16 or not all(c in "0123456789abcdef" for c in session_id):
            return False
        with self._lock:
            cursor = self._open().execute(
                "DELETE FROM ui_sessions WHERE substr(hash, 1, 16) = ?", (session_id,)
            )
        return cursor.rowcount > 0

    def listed(self) -> list[Session]:
        """The sessions, most recently used first (csrf tokens left out)."""
        with self._lock:
            rows = (
                self._open()
                .execute(
                    "SELECT hash, key_id, role, device, created, last_seen FROM ui_sessions "
                    "ORDER BY last_seen DESC"
                )
                .fetchall()
            )
        return [
            Session(h[:16], key_id, role, "", device, _utc(created), _utc(seen))
            for h, key_id, role, device, created, seen in rows
        ]

    def forget_revoked(self) -> int:
        """Remove the sessions and links of keys no longer configured, and those over (unused
        too long, too old, expired): at start. How many."""
        now = self._clock()
        with self._lock:
            db = self._open()
            removed = db.execute(
                "DELETE FROM ui_sessions WHERE last_seen < ? OR created < ?",
                (_micros(now - self.idle), _micros(now - self.lifetime)),
            ).rowcount
            removed += db.execute(
                "DELETE FROM ui_links WHERE expires <= ?", (_micros(now),)
            ).rowcount
            for table in ("ui_sessions", "ui_links"):
                rows = db.execute(f"SELECT hash, key_id, role FROM {table}").fetchall()
                for digest, key_id, role in rows:
                    if self.known_keys.get(key_id) != role:
                        db.execute(f"DELETE FROM {table} WHERE hash = ?", (digest,))
                        removed += 1
        return removed
