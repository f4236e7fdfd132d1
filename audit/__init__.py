"""Tamper evidence for auditors: the proof logic, with no I/O.

The hub feeds the leaf hashes of its stored records to a Merkle tree (RFC 9162) and signs its
tree heads as checkpoints (C2SP signed notes, Ed25519). An auditor who kept an older checkpoint
can then check offline that a record is in the log (inclusion proof) and that the log only grew
since (consistency proof): nothing edited, deleted or reordered.

Public surface:
- ``merkle``: ``leaf_hash``, ``node_hash``, ``root``, ``CompactTree`` (the sealer's append-only
  tree), ``inclusion_proof`` / ``consistency_proof`` and ``verify_inclusion`` /
  ``verify_consistency``.
- ``note``: ``NoteSigner`` / ``NoteVerifier`` (Ed25519 note keys in Go's key-string formats),
  ``sign_note`` / ``open_note``, ``checkpoint_body`` / ``parse_checkpoint`` / ``Checkpoint``.

Errors (all ``ValueError``)::

    ProofError              a proof that does not prove what it claims
    NoteError               a malformed note, key string or checkpoint
      InvalidSignatureError a known key's signature that does not verify
      UnverifiedNoteError   no signature by a known key

This package imports nothing else of mes-hub.
"""

from audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactTree,
    CompactTreeState,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)
from audit.note import (
    ED25519,
    Checkpoint,
    InvalidSignatureError,
    NoteError,
    NoteSigner,
    NoteVerifier,
    UnverifiedNoteError,
    checkpoint_body,
    key_id,
    open_note,
    parse_checkpoint,
    sign_note,
)

__all__ = [
    "ED25519",
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Checkpoint",
    "CompactTree",
    "CompactTreeState",
    "InvalidSignatureError",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "ProofError",
    "UnverifiedNoteError",
    "checkpoint_body",
    "consistency_proof",
    "inclusion_proof",
    "key_id",
    "leaf_hash",
    "node_hash",
    "open_note",
    "parse_checkpoint",
    "root",
    "sign_note",
    "verify_consistency",
    "verify_inclusion",
]
