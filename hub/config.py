"""One configuration: ``load_config(path)`` reads ``mes-hub.toml`` once and hands each section to
the package that owns it.

| section | owner | model |
|---|---|---|
| ``[hub]`` | ``hub.settings`` | ``Settings`` (also ``MES_HUB_<KEY>``, and command-line options) |
| ``[plant]`` | ``projections.config`` | ``projections.rules.plant.PlantConfig`` |
| ``[adapters]`` | ``adapters.machines.config`` | ``AdaptersConfig`` |
| ``[[erp]]`` | ``adapters.erp.config`` | a list of dialect entries (``ErpEntryBase``) |
| ``[[webhook]]`` | ``adapters.webhooks.config`` | a list of partner endpoints (``WebhookEntry``) |

Every section takes ``MES_HUB_<SECTION>__<KEY>`` environment overrides (``__`` again for nested
keys), and ``MES_HUB_<SECTION>__<KEY>_FILE`` to read a value from a file, so passwords and
secrets need never be written in the TOML. Any problem is a ``hub.settings.ConfigError`` naming
the file or variable, the key and the reason. A new section (erp, webhooks, audit) is one more
entry in ``SECTIONS`` and one more field of ``Config``.

This module sits beside the composition root: it may import every package, the hub's core may
not import it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.erp.base import ErpEntryBase
from adapters.erp.config import erp_section
from adapters.webhooks.config import WebhookEntry, webhook_section
from hub.settings import ENV_PREFIX, ConfigError, Settings, read_toml, settings_section
from projections.config import plant_section
from projections.rules.plant import PlantConfig

if TYPE_CHECKING:  # the adapters (and their protocol libraries) load only when asked for
    from adapters.machines.config import AdaptersConfig

SECTIONS = ("hub", "plant", "adapters", "erp", "webhook")


@dataclass(frozen=True)
class Config:
    """Every section, validated. ``adapters`` is None unless asked for (``load_config``)."""

    path: Path | None
    hub: Settings
    plant: PlantConfig
    adapters: AdaptersConfig | None = None
    erp: list[ErpEntryBase] = field(default_factory=list)
    webhooks: list[WebhookEntry] = field(default_factory=list)


def load_config(
    path: Path | None = None,
    *,
    adapters: bool = False,
    hub_overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read the file once (``path``, else ``MES_HUB_CONFIG``, else none: defaults and the
    environment) and validate every section; ``hub_overrides`` are command-line options.
    ``adapters=True`` also validates ``[adapters]`` (the adapter commands need it; ``serve``
    does not load the protocol libraries)."""
    if path is None and os.environ.get(ENV_PREFIX + "CONFIG"):
        path = Path(os.environ[ENV_PREFIX + "CONFIG"])
    document = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            source, unknown[0], "unknown section; known sections are " + ", ".join(SECTIONS)
        )
    hub = settings_section(document.get("hub", {}), path, **(hub_overrides or {}))
    plant = plant_section(document.get("plant", {}), source)
    adapter_config = None
    if adapters:
        from adapters.machines.config import adapters_section

        base = path.parent if path is not None else Path.cwd()
        adapter_config = adapters_section(document.get("adapters", {}), source, base)
    erp = erp_section(document.get("erp", []), source)
    webhooks = webhook_section(document.get("webhook", []), source)
    # An ERP and an endpoint are both destinations of the outbox, known by name (what each is
    # owed, and from when, is kept under it): one name, one destination.
    erp_names = {e.name for e in erp}
    for n, endpoint in enumerate(webhooks):
        if endpoint.name in erp_names:
            reason = f"{endpoint.name!r} is also an [[erp]] entry's name"
            raise ConfigError(source, f"webhook[{n}].name", reason)
    return Config(path, hub, plant, adapter_config, erp, webhooks)
