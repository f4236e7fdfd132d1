"""``mes-hub audit``: prove the log was not edited, deleted or reordered (``hub.sealer``).

- ``verify``: recompute the Merkle tree from the stored records, check every checkpoint;
- ``evidence``: the evidence bundle of one stored event (its record, proof and checkpoint);
- ``verify-bundle``: check a bundle offline with the hub's public key (``audit`` only);
- ``checkpoint``: export the latest signed checkpoint, or check an exported one against the log;
- ``seal``: seal what is stored now (or ``--follow``: keep sealing; ``serve`` does it itself).

What checks signatures is a public key only (``--public-key``, else the data dir's
``audit.vkey``, else the public half of the configured ``audit_key``): an auditor needs no
private key, and never the store's own record of the key, which whoever holds the database could
replace.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from hub.cli.shared import (
    ConfigOption,
    DataDirOption,
    config_or_exit,
    console,
    err_console,
    existing_store_or_exit,
    settings_or_exit,
)
from hub.settings import Settings
from hub.store import EventStore

if TYPE_CHECKING:
    from audit.note import NoteVerifier

app = typer.Typer(
    help="Tamper evidence: Merkle proofs and signed checkpoints.", no_args_is_help=True
)


@contextlib.contextmanager
def _store(config: Path | None, data_dir: Path | None) -> Iterator[tuple[Settings, EventStore]]:
    settings = settings_or_exit(config, data_dir=data_dir)
    existing_store_or_exit(settings)
    store = config_or_exit(lambda: EventStore(settings))  # (a wrong store key: exit 2)
    try:
        yield settings, store
    finally:
        store.close()


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]{escape(message)}[/]", soft_wrap=True)
    return typer.Exit(code)


PublicKeyOption = Annotated[
    str | None,
    typer.Option(
        "--public-key",
        help="The hub's public key string, or a file holding it (default: the configured "
        "audit_key's public half, else the data dir's audit.vkey)",
    ),
]


def _hub_verifier(settings: Settings, public_key: str | None = None) -> NoteVerifier:
    """The key to check signatures with: ``--public-key``; else the data dir's ``audit.vkey``
    (the hub writes it beside a key it made); else the public half of the configured key file.
    Never the store's record of it, which whoever holds the database could rewrite."""
    from hub.sealer import KEY_FILE, PUBLIC_KEY_FILE, audit_verifier

    if public_key is not None:
        return _verifier_of(public_key)
    public = settings.data_dir / PUBLIC_KEY_FILE
    # Only for a key the hub made there: with audit_key configured, a file in the data dir
    # (which whoever holds the store can write) does not say which key is the hub's.
    if settings.audit_key is None and public.exists():
        return _verifier_of(str(public), "the data dir's public key")
    try:
        verifier = config_or_exit(lambda: audit_verifier(settings))
    except OSError as failure:  # (the key file is not this user's to read)
        path = settings.audit_key or settings.data_dir / KEY_FILE
        raise _fail(
            f"cannot read the checkpoint key {path} ({failure.strerror}): give the hub's public "
            "key with --public-key",
            2,
        ) from None
    if verifier is None:
        raise _fail(
            f"no checkpoint key in {settings.data_dir}: this hub has signed no checkpoint "
            "(or give the hub's public key with --public-key)",
            2,
        )
    return verifier


@app.command("verify")
def audit_verify(
    public_key: PublicKeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Recompute the tree from the stored records; check every checkpoint's signature and its
    root against the records. Exit 1 naming the first position (or checkpoint) that does not
    match."""
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from hub.sealer import AuditError, AuditLog

    with _store(config, data_dir) as (settings, store):
        audit_log = AuditLog(store)
        verifier = _hub_verifier(settings, public_key)
        columns = (
            *Progress.get_default_columns()[:-1],
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("verifying", total=store.last_position())

            def advance(position: int, last: int) -> None:
                bar.update(task, completed=position, total=last)

            try:
                report = audit_log.verify(verifier, advance)
            except AuditError as failure:
                raise _fail(f"verify: {failure}") from None
        console.print(
            f"{report.records:,} records checked against {report.sealed:,} sealed leaves; "
            f"{report.checkpoints:,} checkpoints; {report.unsealed:,} not sealed yet"
        )
        if not report.ok:
            for finding in report.problems:
                err_console.print(f"[red]{finding.what} {finding.at}: {escape(finding.reason)}[/]")
            first = report.bad_position or report.bad_checkpoint or report.problems[0]
            raise _fail(f"verify FAILED: first bad {first.what} {first.at}")
        console.print("[green]verify OK[/]: the log matches every signed checkpoint")


def evidence_of(
    settings: Settings, store: EventStore, position: int, tree_size: int | None = None
) -> dict[str, object]:
    """The evidence bundle of the event at ``position`` (``hub.sealer.AuditLog.evidence``), with
    the public key of the hub's key file."""
    from hub.sealer import AuditLog

    verifier = _hub_verifier(settings)
    return AuditLog(store, verifier=verifier).evidence(position, verifier.key_string(), tree_size)


# Several events' bundles in one file: what one CloudEvent became (an order's start is stored
# on the machine and on the order).
EVIDENCE_SET = "mes-hub-evidence-set-v1"


def _positions_of(settings: Settings, event_id: str) -> list[int]:
    """Where the events of one CloudEvent id are stored, from the audit log view."""
    from hub.bootstrap import open_views
    from projections.views.audit_view import AuditLogReader

    views = open_views(settings, pool_size=1)
    try:
        return AuditLogReader(views).positions_of(event_id)
    finally:
        views.close()


@app.command("evidence")
def audit_evidence(
    out: Annotated[Path, typer.Option("--out", help="Where to write the JSON bundle")],
    position: Annotated[
        int | None, typer.Option("--position", min=1, help="The event's log position")
    ] = None,
    event: Annotated[
        str | None,
        typer.Option("--event", help="A CloudEvent id: the evidence of every event it became"),
    ] = None,
    tree_size: Annotated[
        int | None, typer.Option("--tree-size", min=1, help="A checkpoint's size; none: latest")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Write an evidence bundle: the stored event, its inclusion proof and the signed
    checkpoint, which verify-bundle (or any RFC 9162 verifier) checks offline. With --event,
    one bundle per stored event the CloudEvent became."""
    from hub.sealer import AuditError

    if (position is None) == (event is None):
        raise _fail("give one of --position or --event", 2)
    with _store(config, data_dir) as (settings, store):
        positions = [position] if position is not None else _positions_of(settings, event or "")
        if not positions:
            raise _fail(f"no stored event has the CloudEvent id {event!r} (in the audit log yet)")
        try:
            bundles = [evidence_of(settings, store, p, tree_size) for p in positions]
        except AuditError as failure:
            raise _fail(str(failure)) from None
    document = bundles[0] if len(bundles) == 1 else {"format": EVIDENCE_SET, "bundles": bundles}
    out.write_text(json.dumps(document, indent=2) + "\n")
    for at, bundle in zip(positions, bundles, strict=True):
        console.print(
            f"evidence of position {at}: leaf {bundle['leaf_index']} of the checkpoint of "
            f"{bundle['tree_size']} leaves, written to {out}"
        )


def _verifier_of(public_key: str, what: str = "--public-key") -> NoteVerifier:
    """``--public-key``: the key string itself, or a file holding it."""
    from audit.note import NoteError, NoteVerifier

    text = public_key
    candidate = Path(public_key)
    if "+" not in public_key or candidate.is_file():
        try:
            text = candidate.read_text().strip()
        except (OSError, UnicodeDecodeError) as failure:
            reason = failure.strerror if isinstance(failure, OSError) else "not UTF-8 text"
            raise _fail(f"{what}: not a key string, and {reason}: {public_key}", 2) from None
    try:
        return NoteVerifier.from_key_string(text)
    except NoteError as failure:
        raise _fail(f"{what}: {failure}", 2) from None


@app.command("verify-bundle")
def audit_verify_bundle(
    file: Annotated[Path, typer.Argument(help="An evidence bundle (audit evidence)")],
    public_key: Annotated[
        str, typer.Option("--public-key", help="The hub's public key string, or a file holding it")
    ],
    origin: Annotated[
        str | None,
        typer.Option("--origin", help="The log the checkpoint must be of (e.g. mes-hub/plant-7)"),
    ] = None,
) -> None:
    """Check an evidence bundle offline: the checkpoint's signature by this key (and its
    origin, with --origin), the record's leaf and its inclusion proof up to the signed root.
    Exit 1 naming what fails."""
    from audit.bundle import BundleError, check_bundle

    verifier = _verifier_of(public_key)
    try:
        bundle = json.loads(file.read_text())
    except (OSError, ValueError) as failure:
        raise _fail(f"{file}: not a readable JSON bundle ({failure})", 2) from None
    several = isinstance(bundle, dict) and bundle.get("format") == EVIDENCE_SET
    listed = bundle.get("bundles") if several else [bundle]
    if not isinstance(listed, list) or not listed:
        raise _fail("bundle FAILED: an evidence set without a list of bundles")
    for one in listed:
        try:
            checked = check_bundle(one, verifier, origin=origin)
        except BundleError as failure:
            raise _fail(f"bundle FAILED: {failure}") from None
        record = checked.record
        console.print(
            f"[green]bundle OK[/]: the event at position {record.position} "
            f"({record.topic}, aggregate {record.originator_id} v{record.originator_version}) "
            f"is leaf {checked.leaf_index} of the signed tree of {checked.checkpoint.size} "
            f"leaves of origin {escape(checked.checkpoint.origin)}"
        )


@app.command("checkpoint")
def audit_checkpoint(
    export: Annotated[
        bool, typer.Option("--export", help="Print or write the latest checkpoint")
    ] = False,
    out: Annotated[Path | None, typer.Option("--out", help="With --export: write it here")] = None,
    check: Annotated[
        Path | None, typer.Option("--check", help="An exported checkpoint to check against the log")
    ] = None,
    public_key: PublicKeyOption = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """--export: the latest signed checkpoint, for an auditor to keep. --check FILE: whether an
    exported checkpoint is a prefix of the latest signed checkpoint (a consistency proof
    between the two, from the stored tree; the records themselves: verify); exit 1 if not."""
    from audit.note import NoteError
    from hub.sealer import AuditError, AuditLog, checked_checkpoint

    if export == (check is not None):
        raise _fail("give one of --export or --check FILE", 2)
    with _store(config, data_dir) as (settings, store):
        verifier = _hub_verifier(settings, public_key)
        # Sizes and roots from the notes opened with this key, never the rows' columns.
        audit_log = AuditLog(store, verifier=verifier)
        try:
            latest = audit_log.checkpoint()
        except AuditError as failure:
            raise _fail(f"the latest checkpoint: {failure}") from None
        if export:
            if out is None:
                typer.echo(latest.note, nl=False)  # byte for byte: it is signed
            else:
                out.write_text(latest.note)
                console.print(f"checkpoint of {latest.size} leaves written to {out}")
            return
        assert check is not None
        try:
            kept = checked_checkpoint(check.read_text(), verifier)
        except OSError as failure:
            raise _fail(f"{check}: {failure.strerror}", 2) from None
        except NoteError as failure:
            raise _fail(f"{check}: not a checkpoint signed by this hub's key: {failure}") from None
        try:
            proof = audit_log.consistency_with(kept.size, kept.root_hash, latest.size)
        except AuditError as failure:
            raise _fail(f"checkpoint FAILED: {failure}") from None
    console.print(
        f"[green]checkpoint OK[/]: the tree of {kept.size} leaves is a prefix of the log's "
        f"latest signed checkpoint of {latest.size} ({len(proof.proof)} proof hashes; the "
        "records themselves: mes-hub audit verify)"
    )


@app.command("seal")
def audit_seal(
    follow: Annotated[bool, typer.Option("--follow", help="Keep sealing until stopped")] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    settings_from_stdin: Annotated[
        bool,
        typer.Option(
            hidden=True, help="Settings JSON as the first line of input; stop when input ends"
        ),
    ] = False,
    batch: Annotated[int, typer.Option(hidden=True, min=1)] = 5_000,
    kill_in_batch: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
) -> None:
    """Seal what the store holds now and sign a checkpoint of it (serve seals as it runs: this
    is for a store no hub runs on). --follow: keep sealing until stopped."""
    import asyncio

    from hub.sealer import sealer_of

    if settings_from_stdin:  # started by a hub
        from hub.children import read_settings_line
        from hub.settings import settings_from_json

        settings = config_or_exit(lambda: settings_from_json(read_settings_line()))
    else:
        settings = settings_or_exit(config, data_dir=data_dir)
        existing_store_or_exit(settings)
    store = config_or_exit(lambda: EventStore(settings))  # (a wrong store key: exit 2)
    try:
        # Prepared: its tables made, and a key the store's checkpoints were not signed with
        # refused (exit 2).
        sealer = config_or_exit(
            lambda: sealer_of(settings, store, batch=batch, kill_in_batch=kill_in_batch)
        )
        if not (follow or settings_from_stdin):
            sealed = sealer.catch_up()
            console.print(f"sealed {sealed:,} events; the tree has {sealer.size:,} leaves")
            return
        from hub.cli.shared import run_until_signal

        async def main(stop: asyncio.Event) -> None:
            if settings_from_stdin:
                from hub.children import stop_when_input_ends

                stop_when_input_ends(stop)
            await sealer.run(stop)

        run_until_signal(main)
    finally:
        store.close()
