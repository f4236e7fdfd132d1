"""``/api/v1/audit``: the signed checkpoints, inclusion and consistency proofs, and verify
(``hub.sealer``); for the admin and auditor roles only.

Hashes are standard base64, as in the checkpoints themselves. Every proof is checked against the
signed root before it is given: one that does not check means the stored log no longer matches
what was signed (409). The key the checks here use is the hub's from its settings
(``ApiContext.audit_public_key``), never the one recorded in the store, which whoever holds the
database could replace; a checkpoint's size and root are those of its note opened with that key
(a row whose columns say otherwise: 409). An auditor checks with the copy they hold
(``mes-hub audit verify-bundle``). One verify runs at a time (it reads the whole log): another
asked for meanwhile is answered 429."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from hub.api.deps import Auditor, Context, Reads
from hub.api.problems import Problem
from hub.api.reads import JsonAnswer, ReadSources
from hub.sealer import AuditError, AuditLog, AuditMismatch, StoredCheckpoint

if TYPE_CHECKING:
    from audit.note import NoteVerifier

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


def _verifier(public_key: str | None) -> NoteVerifier:
    """The hub's configured checkpoint key (``ApiContext.audit_public_key``)."""
    from audit.note import NoteError, NoteVerifier

    if public_key is None:
        raise AuditError("this hub has no checkpoint key yet: nothing is signed")
    try:
        return NoteVerifier.from_key_string(public_key)
    except NoteError as failure:  # (made from the key file: cannot happen)
        raise AuditError(f"the hub's checkpoint key: {failure}") from None


def _audit_log(sources: ReadSources, public_key: str | None) -> AuditLog:
    return AuditLog(sources.store, verifier=_verifier(public_key))


# --- the reads (in the API's read pool: verify reads the whole log) -------------------------


def read_checkpoints(
    sources: ReadSources, public_key: str | None, before: int | None, limit: int
) -> bytes:
    found = _audit_log(sources, public_key).checkpoints(before, limit + 1)
    page = found[:limit]
    more = len(found) > limit
    answer = CheckpointPage(
        checkpoints=[_out(c) for c in page], next_before=page[-1].size if more else None
    )
    return answer.model_dump_json().encode()


def read_latest(sources: ReadSources, public_key: str | None, note: bool) -> bytes:
    latest = _audit_log(sources, public_key).checkpoint()
    return latest.note.encode() if note else _out(latest).model_dump_json().encode()


def read_inclusion(
    sources: ReadSources, public_key: str | None, position: int, tree_size: int | None
) -> bytes:
    audit_log = _audit_log(sources, public_key)
    bundle = audit_log.evidence(position, _verifier(public_key).key_string(), tree_size)
    return EvidenceOut.model_validate(bundle).model_dump_json().encode()


def read_consistency(
    sources: ReadSources, public_key: str | None, first: int, second: int | None
) -> bytes:
    audit_log = _audit_log(sources, public_key)
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


def read_verify(sources: ReadSources, public_key: str | None) -> bytes:
    """Verify with the hub's configured key; the store's recorded key, if another, is a
    finding (``AuditLog.verify``)."""
    verifier = _verifier(public_key)
    report = AuditLog(sources.store).verify(verifier).to_json()
    return VerifyOut.model_validate(report).model_dump_json().encode()


async def _answer(
    request: Request | None, reads: Reads, work: Callable[..., bytes], *args: Any
) -> bytes:
    """``work`` in the read pool: 404 for what is not there (yet), 409 for a log that no
    longer matches its checkpoints."""
    try:
        return await reads.run(request, work, *args)
    except AuditMismatch as failure:
        raise Problem(409, f"the stored log no longer matches its checkpoints: {failure}") from None
    except AuditError as failure:
        raise Problem(404, str(failure)) from None


class _OneAtATime:
    """One verify at a time in this hub process: it holds a read worker for the whole log.
    Held until the read ends, even if its client went away meanwhile (a read handed to a
    worker runs to its end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._began = 0.0
        self._took = 10.0  # how long the last one took (a first guess)

    async def run(self, reads: Reads, public_key: str | None) -> bytes:
        if not self._lock.acquire(blocking=False):
            left = self._took - (time.monotonic() - self._began)
            retry_after = min(300, max(1, math.ceil(left)))
            raise Problem(
                429,
                f"a verify is running already (one at a time); ask again in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        self._began = time.monotonic()
        # Its own task, shielded: the lock is released when the read ends, not when the
        # request does. No request given: not dropped while queued either.
        try:
            task = asyncio.ensure_future(_answer(None, reads, read_verify, public_key))
        except BaseException:
            self._lock.release()
            raise
        # Released when the task is done, however: also if it is cancelled before its first
        # step (a loop closing), when a ``finally`` inside it would never run. Its outcome is
        # taken even when nobody waits for it any more.
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Future[bytes]) -> None:
        self._took = time.monotonic() - self._began
        self._lock.release()
        if not task.cancelled():
            task.exception()


_VERIFY = _OneAtATime()


# --- the routes -----------------------------------------------------------------------------


@router.get(
    "/checkpoints", summary="The signed checkpoints, newest first", response_model=CheckpointPage
)
async def checkpoints(
    request: Request,
    reads: Reads,
    context: Context,
    _: Auditor,
    before: Annotated[int | None, Query(ge=1, le=2**62, description="Sizes below this")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    key = context.audit_public_key
    return JsonAnswer(await _answer(request, reads, read_checkpoints, key, before, limit))


@router.get(
    "/checkpoints/latest",
    summary="The latest signed checkpoint: JSON, or the note itself with Accept: text/plain",
    response_model=CheckpointOut,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def latest_checkpoint(
    request: Request, reads: Reads, context: Context, _: Auditor
) -> Response:
    accept = request.headers.get("accept", "")
    note = "text/plain" in accept and "application/json" not in accept
    found = await _answer(request, reads, read_latest, context.audit_public_key, note)
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
    context: Context,
    _: Auditor,
    position: Annotated[int, Query(ge=1, le=2**62, description="The event's log position")],
    tree_size: Annotated[
        int | None, Query(ge=1, le=2**62, description="A checkpoint's size; none: the latest")
    ] = None,
) -> Response:
    """The stored record, its leaf index, the inclusion proof and the signed checkpoint: what
    ``mes-hub audit verify-bundle`` (or any RFC 9162 verifier) checks offline."""
    key = context.audit_public_key
    return JsonAnswer(await _answer(request, reads, read_inclusion, key, position, tree_size))


@router.get(
    "/proofs/consistency",
    summary="A consistency proof between two checkpoints",
    response_model=ConsistencyOut,
)
async def consistency(
    request: Request,
    reads: Reads,
    context: Context,
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
    gives (compare it with the root you hold). ``from`` larger than ``to``: 422."""
    if second is not None and first > second:
        raise Problem(
            422, f"from ({first}) is larger than to ({second}): a consistency proof goes from "
            "a smaller tree to a larger one",
        )  # fmt: skip
    key = context.audit_public_key
    return JsonAnswer(await _answer(request, reads, read_consistency, key, first, second))


@router.get(
    "/verify",
    summary="Recompute the tree from the stored records and check it all",
    response_model=VerifyOut,
)
async def verify(request: Request, reads: Reads, context: Context, _: Auditor) -> Response:
    """Every stored record against its sealed leaf, every checkpoint's signature (by the hub's
    configured key) and root against the tree the records make. ``ok`` false names the first
    position or checkpoint that no longer matches. It reads the whole log (in a read worker,
    below ingest): minutes for millions of events; one at a time (429 while one runs)."""
    return JsonAnswer(await _VERIFY.run(reads, context.audit_public_key))


@router.get(
    "/public-key",
    summary="The public key the checkpoints are signed with",
    response_model=PublicKeyOut,
)
async def public_key(context: Context, _: Auditor) -> Response:
    """The hub's configured checkpoint key (what every check here uses)."""
    try:
        key = _verifier(context.audit_public_key).key_string()
    except AuditError as failure:
        raise Problem(404, str(failure)) from None
    return JsonAnswer(PublicKeyOut(public_key=key).model_dump_json().encode())
