"""The ``[[erp]]`` entries of ``mes-hub.toml``: one per ERP the hub talks to, each in its
dialect. Validated at start; an error names the file, the key (``erp[0].secret``) and the reason.

A dialect is a module of this package with:

- ``Entry``: its entry model, on ``adapters.erp.base.ErpEntryBase``, ``dialect`` a literal;
- ``order_source(entry, state_dir=None) -> OrderSource | None``: its orders in (None: it
  sends none); ``state_dir`` where it keeps what it last read (the entry's own, else this);
- ``confirmation_sender(entry) -> ConfirmationSender | None``: its confirmations out.

Dialects load when an entry names them, so a hub without SOAP never imports zeep.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from adapters.erp.base import ConfirmationSender, ErpEntryBase, OrderSource
from hub.settings import ConfigError, section_values, validation_problems

SECTION = "erp"
DIALECTS = {
    "rest": "adapters.erp.rest",
    "odoo": "adapters.erp.odoo",
    "erpnext": "adapters.erp.erpnext",
    "sap": "adapters.erp.sap",
    "soap": "adapters.erp.soap",
    "b2mml": "adapters.erp.b2mml",
}


class ErpConfigError(ConfigError):
    """An ``[[erp]]`` entry that cannot be used: names the file, the key and the reason."""


def dialect(name: str) -> ModuleType:
    return importlib.import_module(DIALECTS[name])


def erp_section(
    entries: Any, source: str, env: Mapping[str, str] | None = None
) -> list[ErpEntryBase]:
    """Every ``[[erp]]`` entry as its dialect's model, with ``MES_HUB_ERP__<N>__<KEY>``
    overrides (``N`` counts the entries from 0, e.g. ``MES_HUB_ERP__0__SECRET__ENV``)."""
    if not isinstance(entries, list):
        raise ErpConfigError(source, SECTION, "must be an array of tables: [[erp]]")
    numbered = {str(n): entry for n, entry in enumerate(entries)}
    values, origins = section_values(SECTION, numbered, source, os.environ if env is None else env)
    if not all(k.isdigit() for k in values):
        odd = next(k for k in values if not k.isdigit())
        raise ErpConfigError(origins.get(odd, source), f"{SECTION}.{odd}", "entries are numbered")
    found: list[ErpEntryBase] = []
    for n in sorted(int(k) for k in values):
        raw, key = values[str(n)], f"{SECTION}[{n}]"
        if not isinstance(raw, dict):
            raise ErpConfigError(source, key, "must be a table")
        name = raw.get("dialect")
        if name not in DIALECTS:
            reason = f"dialect must be one of {', '.join(DIALECTS)}"
            raise ErpConfigError(source, f"{key}.dialect", reason)
        model: type[BaseModel] = dialect(name).Entry
        try:
            entry = model.model_validate(raw)
        except ValidationError as exc:
            problems = validation_problems(exc, key, {}, origins.get(str(n), source))
            raise ErpConfigError.of(problems) from None
        assert isinstance(entry, ErpEntryBase)
        found.append(entry)
    _names_once(found, source)
    return found


def _names_once(entries: Sequence[ErpEntryBase], source: str) -> None:
    seen: set[str] = set()
    for n, entry in enumerate(entries):
        if entry.name in seen:
            raise ErpConfigError(source, f"{SECTION}[{n}].name", f"{entry.name!r} is used twice")
        seen.add(entry.name)


def order_source(entry: ErpEntryBase, state_dir: Path) -> OrderSource | None:
    """The entry's orders in; ``state_dir``: where it may keep what it last read of each order
    (the data dir's ``erp/`` unless the entry names one)."""
    source: OrderSource | None = dialect(_dialect_of(entry)).order_source(
        entry, state_dir=state_dir
    )
    return source


def confirmation_sender(entry: ErpEntryBase) -> ConfirmationSender | None:
    sender: ConfirmationSender | None = dialect(_dialect_of(entry)).confirmation_sender(entry)
    return sender


def _dialect_of(entry: ErpEntryBase) -> str:
    name = getattr(entry, "dialect", None)
    assert isinstance(name, str) and name in DIALECTS
    return name
