from __future__ import annotations

from pydantic import ValidationError


class ContractViolation(ValueError):
    """A message that does not meet contract v1. ``reason`` is what a person reads."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def describe_validation_error(exc: ValidationError, prefix: str = "") -> ContractViolation:
    """Turn pydantic's error list into one sentence naming each field and the rule broken."""
    parts: list[str] = []
    first_field: str | None = None
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        field = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "(message)"
        first_field = first_field or field
        parts.append(f"{field}: {err['msg']}")
    return ContractViolation("; ".join(parts), field=first_field)
