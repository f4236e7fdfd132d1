"""``/api/v1/audit``: the signed checkpoints, inclusion and consistency proofs, and verify
(``hub.sealer``); for the admin and auditor roles only.

Hashes are standard base64, as in the checkpoints themselves. Every proof is checked against the
signed root before it is given: one that does not check means the stored log no longer matches
what was signed (409). The public key the checks here use is the one the sealer recorded when it
started; an auditor checks with the copy they hold (``mes-hub audit verify-bundle``)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from hub.api.deps import Auditor, Reads
from hub.api.problems import Problem
from hub.api.reads import JsonAnswer, ReadSources
from hub.sealer import AuditError, AuditLog, AuditMismatch, StoredCheckpoint

router = APIRouter(prefix="/audit", tags=["audit"])

Size = Annotated[int, Query(ge=1, le=2**62)]


class CheckpointOut(BaseModel):
    size: int = Field(description="The tree size: how many records it seals")
    root: str = Field(description="The Merkle root hash (base64)")
    position: int = Field(description="The log position of its last record")
    signed_at: str = Field(description="When the hub signed it (RFC 3339)")
    note: str = Field(description="The signed note (C2SP tlog-checkpoint)")


class CheckpointPage(BaseModel):
    checkpoints: list[CheckpointOut] = Field(description="Newest first")
    next_before: int | None = Field(description="The next page: ?before=this; null: none")


class TreeOut(BaseModel):
    size: int = Field(description="The tree size")
    root: str = Field(description="Its Merkle root hash (base64), as the stored tree gives it")


class ConsistencyOut(BaseModel):
    first: CheckpointOut | TreeOut
    second: CheckpointOut
    proof: list[str] = Field(description="RFC 9162 consistency proof (base64 hashes)")


class PublicKeyOut(BaseModel):
    public_key: str = Field(description="The checkpoints' Ed25519 note verifier key string")


class RecordOut(BaseModel):
    position: int
    originator_id: str
    originator_version: int
    topic: str
    state: str = Field(description="The stored bytes (base64): ciphertext when encrypted")


class EvidenceOut(BaseModel):
    """What ``mes-hub audit verify-bundle`` (or any RFC 9162 verifier) checks offline."""

    format: str
    record: RecordOut
    leaf_index: int
    tree_size: int
    leaf_hash: str = Field(description="RFC 9162 leaf hash of the record's leaf bytes (base64)")
    inclusion_proof: list[str] = Field(description="Nearest sibling first (base64)")
    checkpoint: str = Field(description="The signed checkpoint note of tree_size")
    public_key: str


class Finding(BaseModel):
    at: int
    reason: str


class VerifyProblem(BaseModel):
    what: str
    at: int
    reason: str


class VerifyOut(BaseModel):
    ok: bool
    records: int = Field(description="Stored records read")
    sealed: int = Field(description="Of them sealed (the others came after the sealer read)")
    unsealed: int
    checkpoints: int = Field(description="Checkpoints checked")
    first_bad_position: Finding | None
    first_bad_checkpoint: Finding | None
    problems: list[VerifyProblem]


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _out(checkpoint: StoredCheckpoint) -> CheckpointOut:
    return CheckpointOut(
        size=checkpoint.size,
        root=_b64(checkpoint.root),
        position=checkpoint.position,
        signed_at=checkpoint.signed_at.isoformat(),
        note=checkpoint.note,
    )


def _public_key(audit_log: AuditLog) -> str:
    found = audit_log.public_key()
    if found is None:
        raise AuditError("the sealer has not started yet: no public key recorded")
    return found


# --- the reads (in the API's read pool: verify reads the whole log) -------------------------


def read_checkpoints(sources: ReadSources, before: int | None, limit: int) -> bytes:
    found = AuditLog(sources.store).checkpoints(before, limit + 1)
    page = found[:limit]
    more = len(found) > limit
    answer = CheckpointPage(
        checkpoints=[_out(c) for c in page], next_before=page[-1].size if more else None
    )
    return answer.model_dump_json().encode()


def read_latest(sources: ReadSources, note: bool) -> bytes:
    latest = AuditLog(sources.store).checkpoint()
    return latest.note.encode() if note else _out(latest).model_dump_json().encode()


def read_inclusion(sources: ReadSources, position: int, tree_size: int | None) -> bytes:
    audit_log = AuditLog(sources.store)
    bundle = audit_log.evidence(position, _public_key(audit_log), tree_size)
    return EvidenceOut.model_validate(bundle).model_dump_json().encode()


def read_consistency(sources: ReadSources, first: int, second: int | None) -> bytes:
    audit_log = AuditLog(sources.store)
    proof = audit_log.consistency(first, second)
    earlier = next(iter(audit_log.checkpoints(before=first + 1, limit=1)), None)
    answer = ConsistencyOut(
        first=_out(earlier)
        if earlier is not None and earlier.size == first
        else TreeOut(size=proof.first_size, root=_b64(proof.first_root)),
        second=_out(proof.second),
        proof=[_b64(v) for v in proof.proof],
    )
    return answer.model_dump_json().encode()


def read_verify(sources: ReadSources) -> bytes:
    from audit.note import NoteError, NoteVerifier

    audit_log = AuditLog(sources.store)
    try:
        verifier = NoteVerifier.from_key_string(_public_key(audit_log))
    except NoteError as failure:
        raise AuditMismatch(f"the recorded public key: {failure}") from None
    report = audit_log.verify(verifier).to_json()
    return VerifyOut.model_validate(report).model_dump_json().encode()


def read_public_key(sources: ReadSources) -> bytes:
    key = _public_key(AuditLog(sources.store))
    return PublicKeyOut(public_key=key).model_dump_json().encode()


async def _answer(request: Request, reads: Reads, work: Callable[..., bytes], *args: Any) -> bytes:
    """``work`` in the read pool: 404 for what is not there (yet), 409 for a log that no
    longer matches its checkpoints."""
    try:
        return await reads.run(request, work, *args)
    except AuditMismatch as failure:
        raise Problem(409, f"the stored log no longer matches its checkpoints: {failure}") from None
    except AuditError as failure:
        raise Problem(404, str(failure)) from None


# --- the routes -----------------------------------------------------------------------------


@router.get(
    "/checkpoints", summary="The signed checkpoints, newest first", response_model=CheckpointPage
)
async def checkpoints(
    request: Request,
    reads: Reads,
    _: Auditor,
    before: Annotated[int | None, Query(ge=1, le=2**62, description="Sizes below this")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    return JsonAnswer(await _answer(request, reads, read_checkpoints, before, limit))


@router.get(
    "/checkpoints/latest",
    summary="The latest signed checkpoint: JSON, or the note itself with Accept: text/plain",
    response_model=CheckpointOut,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def latest_checkpoint(request: Request, reads: Reads, _: Auditor) -> Response:
    accept = request.headers.get("accept", "")
    note = "text/plain" in accept and "application/json" not in accept
    found = await _answer(request, reads, read_latest, note)
    if note:
        return Response(found, media_type="text/plain; charset=utf-8")
    return JsonAnswer(found)


@router.get(
    "/proofs/inclusion",
    summary="An event's inclusion proof, as an evidence bundle",
    response_model=EvidenceOut,
)
async def inclusion(
    request: Request,
    reads: Reads,
    _: Auditor,
    position: Annotated[int, Query(ge=1, le=2**62, description="The event's log position")],
    tree_size: Annotated[
        int | None, Query(ge=1, le=2**62, description="A checkpoint's size; none: the latest")
    ] = None,
) -> Response:
    """The stored record, its leaf index, the inclusion proof and the signed checkpoint: what
    ``mes-hub audit verify-bundle`` (or any RFC 9162 verifier) checks offline."""
    return JsonAnswer(await _answer(request, reads, read_inclusion, position, tree_size))


@router.get(
    "/proofs/consistency",
    summary="A consistency proof between two checkpoints",
    response_model=ConsistencyOut,
)
async def consistency(
    request: Request,
    reads: Reads,
    _: Auditor,
    first: Annotated[
        int, Query(alias="from", ge=1, le=2**62, description="A tree size (an older checkpoint's)")
    ],
    second: Annotated[
        int | None,
        Query(alias="to", ge=1, le=2**62, description="A checkpoint's size; none: the latest"),
    ] = None,
) -> Response:
    """That the tree of ``from`` leaves is a prefix of the checkpoint of ``to``. ``first`` is
    the checkpoint of ``from`` leaves if there is one; else its size and the root the stored tree
    gives (compare it with the root you hold)."""
    return JsonAnswer(await _answer(request, reads, read_consistency, first, second))


@router.get(
    "/verify",
    summary="Recompute the tree from the stored records and check it all",
    response_model=VerifyOut,
)
async def verify(request: Request, reads: Reads, _: Auditor) -> Response:
    """Every stored record against its sealed leaf, every checkpoint's signature, root and
    consistency with the one before. ``ok`` false names the first position or checkpoint that
    no longer matches. It reads the whole log (in a read worker, below ingest): minutes for
    millions of events."""
    return JsonAnswer(await _answer(request, reads, read_verify))


@router.get(
    "/public-key",
    summary="The public key the checkpoints are signed with",
    response_model=PublicKeyOut,
)
async def public_key(request: Request, reads: Reads, _: Auditor) -> Response:
    return JsonAnswer(await _answer(request, reads, read_public_key))
