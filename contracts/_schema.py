"""JSON Schema export: one file per v1 type, for integrators' validators and code generators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from contracts._envelope import CloudEvent
from contracts._partner import PARTNER_EVENT_TYPES
from contracts._types import EVENT_TYPES


def schema_for(type_name: str) -> dict[str, Any]:
    """The JSON Schema of a CloudEvent of ``type_name``: a v1 type the hub takes in, or one it
    tells partners (``PARTNER_EVENT_TYPES``)."""
    if type_name in EVENT_TYPES:
        model: type[BaseModel] = EVENT_TYPES[type_name].data_model
    else:
        model = PARTNER_EVENT_TYPES[type_name]
    envelope = CloudEvent.model_json_schema()
    data = model.model_json_schema()
    defs = {**envelope.pop("$defs", {}), **data.pop("$defs", {})}
    envelope["properties"]["type"] = {"const": type_name, "type": "string"}
    envelope["properties"]["data"] = data
    envelope["title"] = type_name
    envelope["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    envelope["$id"] = f"urn:mes-hub:contracts:{type_name}"
    if defs:
        envelope["$defs"] = defs
    return envelope


def export_json_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for type_name in sorted([*EVENT_TYPES, *PARTNER_EVENT_TYPES]):
        path = directory / f"{type_name}.schema.json"
        path.write_text(json.dumps(schema_for(type_name), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
