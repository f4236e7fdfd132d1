"""Signed notes (c2sp.org/signed-note@v1.0.0) with Ed25519, and checkpoints
(c2sp.org/tlog-checkpoint@v1.0.0): the signed tree heads an auditor keeps and checks offline.

A note is a text ending in a newline, a blank line, then signature lines
``— <key name> <base64(4-byte key id || signature)>`` (an em dash, U+2014). The format and the key
strings are those of Go's golang.org/x/mod/sumdb/note, so its tools can check our notes and ours
theirs:

```python
signer = NoteSigner.generate("mes-hub.example/plant-1")   # keep signer.key_string() secret
vkey = signer.verifier.key_string()                       # give this to auditors
note = sign_note(checkpoint_body(origin, size, root_hash), signer)
checkpoint = parse_checkpoint(open_note(note, [NoteVerifier.from_key_string(vkey)]))
```

Errors: ``NoteError`` (a ``ValueError``) for a malformed note, key string or checkpoint;
``InvalidSignatureError`` when a known key's signature does not verify; ``UnverifiedNoteError``
when no known key signed the note. No message or repr carries private key material.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from audit.merkle import HASH_SIZE

__all__ = [
    "ED25519",
    "Checkpoint",
    "InvalidSignatureError",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "UnverifiedNoteError",
    "checkpoint_body",
    "key_id",
    "open_note",
    "parse_checkpoint",
    "sign_note",
]

ED25519 = 0x01  # the signature type byte of Ed25519 in signed-note

SIGNATURE_PREFIX = "\N{EM DASH} "  # "— ", the start of every signature line

# The spec asks verifiers to accept at least 16 signatures; Go's note package stops at 100, which
# bounds the work a hostile note can cause while leaving room for many witnesses.
MAX_SIGNATURES = 100

_PRIVATE_KEY_PREFIX = "PRIVATE+KEY+"  # Go's signer key strings: PRIVATE+KEY+<name>+<id>+<key>
_KEY_SIZE = 32  # an Ed25519 public key and an Ed25519 seed are both 32 bytes
_SIGNATURE_SIZE = 64
_KEY_ID = re.compile(r"[0-9a-f]{8}")  # the spec's hex: fixed length, lowercase
_TREE_SIZE = re.compile(r"0|[1-9][0-9]*")  # tlog-checkpoint: decimal, no leading zeroes


class NoteError(ValueError):
    """A malformed note, key string or checkpoint, or a note that cannot be trusted."""


class InvalidSignatureError(NoteError):
    """A signature by a known key that does not verify: the note was altered, or forged."""


class UnverifiedNoteError(NoteError):
    """A note with no signature by any of the known keys."""


def key_id(name: str, public_key: bytes) -> int:
    """The key id of an Ed25519 note key: the first 4 bytes, big-endian, of
    SHA-256(name || 0x0A || 0x01 || public key)."""
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ED25519]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class NoteVerifier:
    """A public note key: what an auditor holds to check notes signed by ``name``."""

    name: str
    public_key: bytes  # 32 bytes (RFC 8032)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.public_key) != _KEY_SIZE:
            raise NoteError(
                f"an Ed25519 public key is {_KEY_SIZE} bytes, not {len(self.public_key)}"
            )

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.public_key)

    @classmethod
    def from_key_string(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        parts = vkey.split("+", 2)  # base64 may itself hold "+", the name may not
        if len(parts) != 3:
            raise NoteError("a verifier key is <name>+<hex key id>+<base64 key>")
        name, hex_id, key_text = parts
        key = _decode_key(key_text, "verifier key")
        verifier = cls(name, key)
        _check_key_id(hex_id, verifier.key_id, "verifier key")
        return verifier

    def key_string(self) -> str:
        return f"{self.name}+{self.key_id:08x}+{_encode_key(self.public_key)}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (without the key id) is this key's Ed25519 signature of
        ``message``."""
        if len(signature) != _SIGNATURE_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """A private note key. Its repr shows only the name and key id."""

    __slots__ = ("_key", "_name", "_verifier")

    def __init__(self, name: str, seed: bytes) -> None:
        _check_name(name)
        if len(seed) != _KEY_SIZE:
            raise NoteError(f"an Ed25519 seed is {_KEY_SIZE} bytes")  # its length only, not it
        self._name = name
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._verifier = NoteVerifier(name, public_key)

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        """A new random key named ``name``."""
        seed = Ed25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()
        )
        return cls(name, seed)

    @classmethod
    def from_key_string(cls, skey: str) -> NoteSigner:
        """Parse Go's ``PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>``."""
        # The messages below describe the string's shape, never quote it: it is a secret.
        if not skey.startswith(_PRIVATE_KEY_PREFIX):
            raise NoteError("a signer key starts with PRIVATE+KEY+")
        parts = skey.removeprefix(_PRIVATE_KEY_PREFIX).split("+", 2)
        if len(parts) != 3:
            raise NoteError("a signer key is PRIVATE+KEY+<name>+<hex key id>+<base64 key>")
        name, hex_id, key_text = parts
        signer = cls(name, _decode_key(key_text, "signer key"))
        # The id is of the public key, so a seed that does not match the id fails here.
        _check_key_id(hex_id, signer.key_id, "signer key")
        return signer

    def key_string(self) -> str:
        """The secret key string (Go's format): store it as a secret."""
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return f"{_PRIVATE_KEY_PREFIX}{self._name}+{self.key_id:08x}+{_encode_key(seed)}"

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_id(self) -> int:
        return self._verifier.key_id

    @property
    def verifier(self) -> NoteVerifier:
        """The public half, to give to whoever checks this key's notes."""
        return self._verifier

    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature of ``message`` (64 bytes; deterministic)."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"NoteSigner(name={self._name!r}, key_id={self.key_id:08x})"


def sign_note(text: str, signer: NoteSigner) -> str:
    """The signed note of ``text`` (which must end in a newline) with one signature line."""
    _check_text(text)
    if not text.endswith("\n"):
        raise NoteError("a note text must end with a newline")
    signature = signer.key_id.to_bytes(4, "big") + signer.sign(text.encode("utf-8"))
    return f"{text}\n{SIGNATURE_PREFIX}{signer.name} {base64.b64encode(signature).decode()}\n"


def open_note(note: str | bytes, verifiers: Iterable[NoteVerifier]) -> str:
    """The text of ``note`` once a signature by one of ``verifiers`` verified it.

    Signatures by other keys are ignored (they may be witnesses' or a rotated key's), as the spec
    requires; a signature by a known key that does not verify rejects the whole note.
    """
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not UTF-8") from None
    _check_text(note)
    # The text ends at the last blank line: texts may hold blank lines, signatures may not.
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text, signature_block = note[: split + 1], note[split + 2 :]
    if not signature_block:
        raise NoteError("malformed note: no signature lines")
    if not signature_block.endswith("\n"):
        raise NoteError("malformed note: it does not end with a newline")
    lines = signature_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")

    known: dict[tuple[str, int], list[NoteVerifier]] = {}
    for verifier in verifiers:
        known.setdefault((verifier.name, verifier.key_id), []).append(verifier)

    message = text.encode("utf-8")
    verified: set[tuple[str, int]] = set()
    for line in lines:
        name, key, signature = _parse_signature_line(line)
        candidates = known.get((name, key))
        if candidates is None or (name, key) in verified:
            continue  # an unknown key (ignored, as the spec says) or a repeated signature
        if len(candidates) > 1:
            raise NoteError(f"ambiguous key {name}+{key:08x}: given more than once")
        if not candidates[0].verify(message, signature):
            raise InvalidSignatureError(f"invalid signature for key {name}+{key:08x}")
        verified.add((name, key))
    if not verified:
        raise UnverifiedNoteError("the note has no signature by a known key")
    return text


@dataclass(frozen=True)
class Checkpoint:
    """A log's signed tree head: its origin, the tree size and the Merkle root hash at that size.
    Extension lines are opaque; the spec advises against them."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        return checkpoint_body(self.origin, self.size, self.root_hash, self.extensions)


def checkpoint_body(
    origin: str, size: int, root_hash: bytes, extensions: Sequence[str] = ()
) -> str:
    """The note text of a checkpoint: ``<origin>\\n<size>\\n<base64 root hash>\\n`` and any
    extension lines."""
    if not origin or not _is_one_line(origin):
        raise ValueError("a checkpoint origin is one non-empty line without control characters")
    if size < 0:
        raise ValueError(f"a tree size is not negative: {size}")
    if len(root_hash) != HASH_SIZE:
        raise ValueError(f"a root hash is {HASH_SIZE} bytes, not {len(root_hash)}")
    for extension in extensions:
        if not extension or not _is_one_line(extension):
            raise ValueError("an extension line is non-empty and without control characters")
    lines = [origin, str(size), base64.b64encode(root_hash).decode("ascii"), *extensions]
    return "".join(f"{line}\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """The checkpoint in a note text (as ``open_note`` returns it). The caller must still check
    that the origin is the log it expects."""
    if not text.endswith("\n"):
        raise NoteError("malformed checkpoint: it does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("malformed checkpoint: fewer than three lines")
    origin, size_text, root_text, *extensions = lines
    if not origin or not _is_one_line(origin):
        raise NoteError("malformed checkpoint: the origin line is empty or has control characters")
    if _TREE_SIZE.fullmatch(size_text) is None:
        raise NoteError("malformed checkpoint: the tree size is not a decimal without leading 0s")
    root_hash = _decode_base64(root_text)
    if root_hash is None or len(root_hash) != HASH_SIZE:
        raise NoteError(f"malformed checkpoint: the root hash is not base64 of {HASH_SIZE} bytes")
    if not all(extension and _is_one_line(extension) for extension in extensions):
        raise NoteError("malformed checkpoint: an empty extension line or control characters")
    return Checkpoint(origin, int(size_text), root_hash, tuple(extensions))


# --- helpers -------------------------------------------------------------------------------------


def _parse_signature_line(line: str) -> tuple[str, int, bytes]:
    """(key name, key id, signature) of ``— <name> <base64(key id || signature)>``."""
    if not line.startswith(SIGNATURE_PREFIX):
        raise NoteError("malformed note: a signature line does not start with an em dash")
    name, space, encoded = line.removeprefix(SIGNATURE_PREFIX).partition(" ")
    signature = _decode_base64(encoded)
    if not space or not _is_valid_name(name) or signature is None or len(signature) < 5:
        raise NoteError("malformed note: a signature line is not '— <name> <base64>'")
    return name, int.from_bytes(signature[:4], "big"), signature[4:]


def _is_valid_name(name: str) -> bool:
    # The spec: non-empty, no Unicode spaces, no "+" (it separates a key string's parts); control
    # characters are refused anywhere in a note.
    return bool(name) and not any(char.isspace() or char == "+" or char < " " for char in name)


def _check_name(name: str) -> None:
    if not _is_valid_name(name):
        raise NoteError(f"a key name is non-empty, without spaces or '+': {name!r}")


def _check_text(text: str) -> None:
    # Notes are UTF-8 without ASCII control characters other than the newline.
    if any(char < " " and char != "\n" for char in text):
        raise NoteError("malformed note: it holds a control character other than newline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text can carry it
        raise NoteError("malformed note: not valid Unicode") from None


def _is_one_line(line: str) -> bool:
    return not any(char < " " for char in line)


def _decode_base64(text: str) -> bytes | None:
    """Standard base64, strictly: other characters, missing padding or spare bits set give None,
    so each value has one spelling only."""
    try:
        value = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    return value if base64.b64encode(value).decode("ascii") == text else None


def _decode_key(text: str, what: str) -> bytes:
    """The 32 key bytes of base64(0x01 || key); the messages never quote ``text``."""
    value = _decode_base64(text)
    if value is None:
        raise NoteError(f"the {what}'s key is not base64")
    if not value or value[0] != ED25519:
        raise NoteError(f"the {what} is not an Ed25519 key (signature type 0x01)")
    if len(value) != 1 + _KEY_SIZE:
        raise NoteError(f"the {what}'s Ed25519 key is not {_KEY_SIZE} bytes")
    return value[1:]


def _encode_key(key: bytes) -> str:
    return base64.b64encode(bytes([ED25519]) + key).decode("ascii")


def _check_key_id(hex_id: str, expected: int, what: str) -> None:
    if _KEY_ID.fullmatch(hex_id) is None:
        raise NoteError(f"the {what}'s key id is not 8 lowercase hex digits")
    if int(hex_id, 16) != expected:
        raise NoteError(f"the {what}'s key id does not match its name and key")
