"""What the hub seals of each stored record (the leaf encoding), and the evidence bundle that
proves one record is in the signed log, checked offline with this package alone.

The leaf of the record at log position ``p`` is, byte for byte (integers big-endian, unsigned)::

    b"mes-hub-leaf-v1\\n"           16 bytes, the format's name and version
    position                         8 bytes
    aggregate (originator) id       16 bytes, the UUID's bytes
    aggregate version                8 bytes
    len(topic)                       4 bytes, then the topic in UTF-8
    state                            the rest: the stored bytes as they are (ciphertext when the
                                     store encrypts, so a proof outlives a deleted key)

and its Merkle leaf hash is RFC 9162's SHA-256(0x00 || leaf). Any RFC 9162 verifier can recompute
it from a bundle's record.

A bundle (``evidence_bundle`` makes one, ``check_bundle`` checks one) is JSON::

    {"format": "mes-hub-evidence-v1",
     "record": {"position", "originator_id", "originator_version", "topic",
                "state": base64},
     "leaf_index", "tree_size", "leaf_hash": base64,
     "inclusion_proof": [base64, ...],          nearest sibling first
     "checkpoint": "<the signed note, C2SP tlog-checkpoint>",
     "public_key": "<the hub's note verifier key string>"}

The key in the bundle is a convenience only: ``check_bundle`` trusts the key its caller holds.

Errors: ``BundleError`` (a ``ValueError``) naming what fails: the bundle's shape, the record, the
checkpoint's signature, the tree size, or the inclusion proof.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from audit.merkle import ProofError, leaf_hash, verify_inclusion
from audit.note import Checkpoint, NoteError, NoteVerifier, open_note, parse_checkpoint

__all__ = [
    "BUNDLE_FORMAT",
    "LEAF_HEADER",
    "BundleCheck",
    "BundleError",
    "Record",
    "check_bundle",
    "evidence_bundle",
    "leaf_bytes",
    "record_leaf",
    "record_leaf_hash",
]

LEAF_HEADER = b"mes-hub-leaf-v1\n"
BUNDLE_FORMAT = "mes-hub-evidence-v1"
_U64 = 1 << 64


class BundleError(ValueError):
    """A bundle that does not prove what it claims; the message names the part that fails."""


@dataclass(frozen=True)
class Record:
    """One stored record of the log, as the store holds it."""

    position: int
    originator_id: UUID
    originator_version: int
    topic: str
    state: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "originator_id": str(self.originator_id),
            "originator_version": self.originator_version,
            "topic": self.topic,
            "state": base64.b64encode(self.state).decode("ascii"),
        }

    @classmethod
    def from_json(cls, value: object) -> Record:
        if not isinstance(value, Mapping):
            raise BundleError("the record is not a JSON object")
        try:
            return cls(
                position=_integer(value["position"], "position"),
                originator_id=UUID(str(value["originator_id"])),
                originator_version=_integer(value["originator_version"], "originator_version"),
                topic=_text(value["topic"], "topic"),
                state=_base64(value["state"], "the record's state"),
            )
        except KeyError as missing:
            raise BundleError(f"the record has no {missing.args[0]!r}") from None
        except ValueError as wrong:
            raise BundleError(f"the record: {wrong}") from None


def record_leaf(record: Record) -> bytes:
    """The leaf bytes of ``record`` (the encoding in this module's docstring)."""
    return leaf_bytes(
        record.position,
        record.originator_id.bytes,
        record.originator_version,
        record.topic,
        record.state,
    )


def leaf_bytes(
    position: int, originator_id: bytes, version: int, topic: str, state: bytes
) -> bytes:
    """``record_leaf`` of a record given field by field (``originator_id``: the UUID's 16
    bytes), for a reader of the log that need not build a ``Record`` of each."""
    if not 0 <= position < _U64 or not 0 <= version < _U64:
        raise ValueError("a position and a version are unsigned 64-bit integers")
    if len(originator_id) != 16:
        raise ValueError("an originator id is a UUID's 16 bytes")
    encoded = topic.encode("utf-8")
    return b"".join(
        (
            LEAF_HEADER,
            position.to_bytes(8, "big"),
            originator_id,
            version.to_bytes(8, "big"),
            len(encoded).to_bytes(4, "big"),
            encoded,
            state,
        )
    )


def record_leaf_hash(record: Record) -> bytes:
    """The Merkle leaf hash of ``record``: SHA-256(0x00 || ``record_leaf(record)``)."""
    return leaf_hash(record_leaf(record))


def evidence_bundle(
    record: Record,
    leaf_index: int,
    tree_size: int,
    proof: Sequence[bytes],
    checkpoint_note: str,
    public_key: str,
) -> dict[str, Any]:
    """The JSON bundle proving ``record`` is leaf ``leaf_index`` of the signed tree."""
    return {
        "format": BUNDLE_FORMAT,
        "record": record.to_json(),
        "leaf_index": leaf_index,
        "tree_size": tree_size,
        "leaf_hash": _b64(record_leaf_hash(record)),
        "inclusion_proof": [_b64(value) for value in proof],
        "checkpoint": checkpoint_note,
        "public_key": public_key,
    }


@dataclass(frozen=True)
class BundleCheck:
    """What a bundle proved: ``record`` is leaf ``leaf_index`` of ``checkpoint``'s tree."""

    record: Record
    leaf_index: int
    checkpoint: Checkpoint


def check_bundle(
    bundle: object, verifier: NoteVerifier, *, origin: str | None = None
) -> BundleCheck:
    """Check every part of an evidence bundle with the key the caller trusts: the checkpoint's
    signature, its origin (with ``origin``: the log the caller expects; else the caller looks
    at ``BundleCheck.checkpoint.origin``), that its size is the bundle's, the record's leaf
    hash, and the inclusion proof from that leaf to the signed root. ``BundleError`` names the
    first part that fails."""
    if not isinstance(bundle, Mapping):
        raise BundleError("the bundle is not a JSON object")
    if bundle.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"the bundle's format is not {BUNDLE_FORMAT!r}")
    record = Record.from_json(bundle.get("record"))
    leaf_index = _integer(bundle.get("leaf_index"), "leaf_index")
    tree_size = _integer(bundle.get("tree_size"), "tree_size")
    note = bundle.get("checkpoint")
    if not isinstance(note, str):
        raise BundleError("the bundle has no checkpoint note")
    try:
        checkpoint = parse_checkpoint(open_note(note, [verifier]))
    except NoteError as failure:
        raise BundleError(f"the checkpoint's signature: {failure}") from None
    if origin is not None and checkpoint.origin != origin:
        raise BundleError(
            f"the checkpoint's origin: {checkpoint.origin!r}, not the expected {origin!r}"
        )
    if checkpoint.size != tree_size:
        raise BundleError(
            f"the tree size: the bundle says {tree_size}, the signed checkpoint {checkpoint.size}"
        )
    proof_values = bundle.get("inclusion_proof")
    if not isinstance(proof_values, list):
        raise BundleError("the inclusion proof is not a list")
    proof = [_base64(value, f"inclusion proof hash #{n}") for n, value in enumerate(proof_values)]
    computed = record_leaf_hash(record)
    claimed = bundle.get("leaf_hash")
    if claimed is not None and _base64(claimed, "the leaf hash") != computed:
        raise BundleError("the record: its leaf hash is not the bundle's (the record was changed)")
    try:
        verify_inclusion(computed, leaf_index, tree_size, proof, checkpoint.root_hash)
    except ProofError as failure:
        raise BundleError(f"the inclusion proof: {failure}") from None
    return BundleCheck(record, leaf_index, checkpoint)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _base64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise BundleError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BundleError(f"{what} is not base64") from None


def _integer(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError(f"{what} is not a non-negative integer")
    return value


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise BundleError(f"{what} is not a string")
    return value
