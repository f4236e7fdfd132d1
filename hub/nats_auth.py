"""Who may publish and read what on NATS: one identity per kind of client, with permissions.

Without them any client that reaches NATS could publish ``mes.<site>.hub.plant…configured`` (a
planned stop over years zeroes a site's OEE) or a delivery forecast, past every API role. So:

- ``hub``: the hub itself (ingest, the forecast watch, the plant's configuration): everything.
- ``api``: the hub's API, which publishes what its callers may send (machine, operator and ERP
  events, never the hub's own).
- ``machines``: machine adapters: ``mes.<site>.machine.>`` only.
- ``erp``: ERP adapters: ``mes.<site>.erp.>`` only.
- ``reader``: integrators who subscribe: may read ``mes.>``, may publish nothing.

Every identity but ``reader`` may receive on an inbox of its own, ``_INBOX_<identity>.>`` (a
JetStream publish waits for its ack there), and on no one else's. With the embedded server the
hub generates a password per identity once, keeps them in ``<data_dir>/nats-credentials.json``
(mode 0600), and starts nats-server with these users;
``mes-hub nats credentials --identity machines`` prints one identity's file for an adapter
host. For an external NATS the same permissions are set up there (docs/nats.md), and the hub
is given the file. The hub also signs what it publishes of its own (an HMAC with a key only it
holds), and ingest refuses a hub event that is not signed so.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hub.settings import ConfigError, Settings

Identity = Literal["hub", "api", "machines", "erp", "reader"]
IDENTITIES: tuple[Identity, ...] = ("hub", "api", "machines", "erp", "reader")
SIGNATURE_HEADER = "Mes-Hub-Signature"
CREDENTIALS_FILE = "nats-credentials.json"
NATS_URL_FILE = "nats.url"  # the embedded server's URL, for adapters on the same machine
SIGNING_KEY_FILE = "hub-signing.key"
SIGNING_SINCE_FILE = "hub-signing.since"


def permissions(identity: Identity, site: str) -> dict[str, Any]:
    """The NATS permissions of ``identity`` at ``site`` (nats-server's configuration form)."""
    families = {"api": ["machine", "operator", "erp"], "machines": ["machine"], "erp": ["erp"]}
    if identity == "hub":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if identity == "reader":
        return {"publish": {"deny": [">"]}, "subscribe": {"allow": ["mes.>"]}}
    return {
        "publish": {"allow": [f"mes.{site}.{family}.>" for family in families[identity]]},
        "subscribe": {"allow": [f"{inbox_prefix(identity)}.>"]},
    }


def inbox_prefix(user: str) -> str:
    """Each identity receives its replies under a prefix of its own, and may subscribe to no
    other: nobody reads the hub's fetched events or another client's acks."""
    return f"_INBOX_{user}"


@dataclass(frozen=True)
class Credentials:
    """One identity's user and password on a NATS server."""

    user: str
    password: str

    def __repr__(self) -> str:  # never show the password
        return f"Credentials(user={self.user!r}, password='**********')"

    def document(self, url: str, site: str) -> dict[str, str]:
        """The credentials file of an adapter host: where, who, and the site whose subjects
        this identity may publish (an adapter set up for another site is refused at start)."""
        return {"url": url, "site": site, "user": self.user, "password": self.password}


def write_private(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Write ``text`` readable by this user only (0600 from the start, never through a
    symlink). ``exclusive``: only if the file does not exist yet; returns whether it wrote (two
    processes starting at once must not each make their own secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_EXCL if exclusive else os.O_TRUNC)
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileExistsError:
        if exclusive:
            return False
        raise
    with os.fdopen(descriptor, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an older file kept its mode through O_CREAT
        file.write(text)
    return True


def identities(path: Path) -> dict[Identity, Credentials]:
    """Every identity's password, from a file ``{"hub": "…", "api": "…", …}``."""
    try:
        stored = json.loads(path.read_text())
        return {i: Credentials(i, str(stored[i])) for i in IDENTITIES}
    except FileNotFoundError:
        raise ConfigError(str(path), None, "file not found") from None
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            str(path), None, f"not a NATS identities file (a password for each of {IDENTITIES})"
        ) from None


def generated_credentials(data_dir: Path) -> dict[Identity, Credentials]:
    """The identities' credentials kept in the data dir, made on first use."""
    path = data_dir / CREDENTIALS_FILE
    made = new_credentials()
    text = json.dumps({i: c.password for i, c in made.items()}, indent=2)
    return made if write_private(path, text, exclusive=True) else identities(path)


def new_credentials() -> dict[Identity, Credentials]:
    return {i: Credentials(i, secrets.token_urlsafe(24)) for i in IDENTITIES}


def read_credentials(path: Path) -> tuple[Credentials, str | None, str | None]:
    """An identity's credentials file (``mes-hub nats credentials`` writes them), and the URL
    and the site it names, if any (files from before the site was written name none)."""
    try:
        document = json.loads(path.read_text())
        url, site = document.get("url"), document.get("site")
        credentials = Credentials(str(document["user"]), str(document["password"]))
    except FileNotFoundError:
        raise ConfigError(str(path), None, "file not found") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(str(path), None, "not a NATS credentials file (user, password)") from None
    return credentials, str(url) if url else None, str(site) if site else None


def server_config(credentials: dict[Identity, Credentials], site: str) -> str:
    """The ``authorization`` block of nats-server's configuration (JSON is valid there)."""
    users = [
        {"user": c.user, "password": c.password, "permissions": permissions(i, site)}
        for i, c in credentials.items()
    ]
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"


def signing_key(data_dir: Path) -> bytes:
    """The key the hub signs its own events with, made on first use (mode 0600)."""
    path = data_dir / SIGNING_KEY_FILE
    write_private(path, secrets.token_hex(32), exclusive=True)
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise ConfigError(str(path), None, "not a signing key the hub wrote") from None


def signing_since(data_dir: Path, stream_end: int) -> int:
    """The stream position at which this data dir's key began to sign: the hub's events at or
    before it were published unsigned (before signing existed, or under a key since lost) and
    are taken as they are when the stream is read again; every later one must be signed.
    Recorded once, with the key, as the stream's end at that moment."""
    path = data_dir / SIGNING_SINCE_FILE
    write_private(path, str(stream_end), exclusive=True)
    text = path.read_text().strip()
    if not text.isdigit():
        raise ConfigError(str(path), None, "not a stream position the hub wrote")
    return int(text)


def signature(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def signed_by(key: bytes, body: bytes, claimed: str | None) -> bool:
    # As bytes: compare_digest refuses a str that is not ASCII (a forged header must be a "no",
    # not an error that stops ingest).
    expected = signature(key, body).encode()
    return claimed is not None and hmac.compare_digest(expected, claimed.encode(errors="replace"))


def nats_identities(settings: Settings) -> dict[Identity, Credentials] | None:
    """The identities' credentials: made in the data dir for the embedded server, read from
    ``nats_identities`` for an external one; None: an external NATS without them (open)."""
    if settings.nats_url is None:
        return generated_credentials(settings.data_dir)
    if settings.nats_identities is not None:
        return identities(settings.nats_identities)
    return None


def adapter_link(
    settings: Settings, identity: Identity = "machines"
) -> tuple[str | None, Credentials | None]:
    """Where an adapter finds the hub's NATS and who it is there: ``nats_url`` and
    ``nats_credentials``; on the hub's own machine, failing those, what the hub left in its data
    dir (the embedded server's URL and ``identity``'s credentials — only together: its
    passwords never go to a server named elsewhere)."""
    if settings.nats_credentials is not None:
        credentials, named, site = read_credentials(settings.nats_credentials)
        if site is not None and site != settings.site:
            # NATS would refuse every event (its subjects name the site): say so now.
            reason = (
                f"these credentials publish for site {site!r} only, and this adapter's site is "
                f"{settings.site!r}: set [hub] site = {site!r}"
            )
            raise ConfigError(str(settings.nats_credentials), "site", reason)
        return settings.nats_url or named, credentials
    if settings.nats_url is not None:
        return settings.nats_url, None
    url_file = settings.data_dir / NATS_URL_FILE
    generated = settings.data_dir / CREDENTIALS_FILE
    if url_file.exists() and generated.exists():
        return url_file.read_text().strip() or None, identities(generated)[identity]
    return None, None
