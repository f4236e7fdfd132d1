"""The webhook registry's fold (``hub.webhook_registry.apply_change``) and its reader
(``Registry``): partners, their keys and endpoints as the ``mes.hub.webhooks.changed.v1``
events make them."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from hub.webhook_registry import Registry, apply_change, empty


def at(hour: int) -> str:
    return f"2026-03-02T{hour:02d}:00:00+00:00"


def fold(changes: Iterable[Mapping[str, Any]], state: Mapping[str, Any] | None = None) -> Any:
    """The state after ``changes``, the n-th made at hour n (from 06:00)."""
    state = state if state is not None else empty()
    for hour, change in enumerate(changes, start=6):
        state = apply_change(state, change, at(hour))
    return state


def partner(partner_id: str = "acme", **fields: Any) -> dict[str, Any]:
    return {"action": "partner_saved", "partner_id": partner_id, "fields": fields, "by": "admin"}


def endpoint(endpoint_id: str, partner_id: str | None = "acme", **fields: Any) -> dict[str, Any]:
    return {
        "action": "endpoint_saved", "partner_id": partner_id, "endpoint_id": endpoint_id,
        "fields": fields, "by": "admin",
    }  # fmt: skip


def key(action: str, key_id: str, partner_id: str = "acme", **fields: Any) -> dict[str, Any]:
    return {
        "action": action, "partner_id": partner_id, "key_id": key_id, "fields": fields,
        "by": "admin",
    }  # fmt: skip


def rotated(endpoint_id: str, secret_id: str, old_expire_at: str) -> dict[str, Any]:
    return {
        "action": "secret_rotated", "partner_id": "acme", "endpoint_id": endpoint_id,
        "fields": {"secret": {"id": secret_id, "fingerprint": f"fp-{secret_id}"},
                   "old_expire_at": old_expire_at},
        "by": "admin",
    }  # fmt: skip


def status(action: str, endpoint_id: str, partner_id: str | None, reason: str = "") -> Any:
    return {
        "action": action, "partner_id": partner_id, "endpoint_id": endpoint_id, "by": "admin",
        "reason": reason,
    }  # fmt: skip


def test_a_partner_saved_then_patched_keeps_the_fields_the_patch_does_not_name() -> None:
    # Saved as "Acme", supplier of part P-1; then patched with only its name "Acme GmbH":
    # still a supplier of P-1, now named "Acme GmbH".
    state = fold(
        [
            partner(name="Acme", kind="supplier", part_numbers=["P-1"]),
            partner(name="Acme GmbH"),
        ]
    )
    acme = Registry(state).partner("acme")
    assert acme is not None
    assert acme["name"] == "Acme GmbH"
    assert acme["kind"] == "supplier"
    assert acme["part_numbers"] == ["P-1"]
    assert acme["created_at"] == at(6)  # (made by the first change, patched by the second)
    assert acme["updated_at"] == at(7)


def test_an_endpoint_for_a_partner_that_does_not_exist_is_not_created() -> None:
    # Only "acme" exists: an endpoint saved for "ghost" is no endpoint, and its id is free.
    state = fold([partner(), endpoint("ep-1", partner_id="ghost", url="https://x.example")])
    registry = Registry(state)
    assert registry.endpoint("ep-1") is None
    assert registry.partner_endpoints() == []
    assert not registry.used("ep-1")


def test_a_rotation_expires_the_old_secret_at_old_expire_at_and_lists_both() -> None:
    # s1 (from the registration); rotated at 08:00 to s2 with the overlap until 09:00:
    # s1 expires at 09:00, s2 does not expire; both are listed, s1 first.
    state = fold(
        [
            partner(),
            endpoint("ep-1", url="https://x.example", secret={"id": "s1", "fingerprint": "fp"}),
            rotated("ep-1", "s2", old_expire_at=at(9)),
        ]
    )
    secrets = Registry(state).endpoint("ep-1")["secrets"]  # type: ignore[index]
    assert [(s["id"], s["expires_at"]) for s in secrets] == [("s1", at(9)), ("s2", None)]
    assert secrets[1]["created_at"] == at(8)


def test_a_second_rotation_does_not_extend_an_earlier_expiry() -> None:
    # s1 expires at 10:00 (first rotation, to s2); a second rotation, to s3, with the overlap
    # until 12:00: s1 still expires at 10:00, s2 at 12:00, s3 never.
    state = fold(
        [
            partner(),
            endpoint("ep-1", url="https://x.example", secret={"id": "s1", "fingerprint": "fp"}),
            rotated("ep-1", "s2", old_expire_at=at(10)),
            rotated("ep-1", "s3", old_expire_at=at(12)),
        ]
    )
    secrets = Registry(state).endpoint("ep-1")["secrets"]  # type: ignore[index]
    assert [(s["id"], s["expires_at"]) for s in secrets] == [
        ("s1", at(10)),
        ("s2", at(12)),
        ("s3", None),
    ]


def test_a_rotation_with_a_shorter_overlap_brings_an_earlier_expiry_forward() -> None:
    # s1 expires at 12:00 (first rotation, to s2); a second rotation, to s3, with the overlap
    # until 10:00 only (a leaked secret): s1 and s2 both expire at 10:00.
    state = fold(
        [
            partner(),
            endpoint("ep-1", url="https://x.example", secret={"id": "s1", "fingerprint": "fp"}),
            rotated("ep-1", "s2", old_expire_at=at(12)),
            rotated("ep-1", "s3", old_expire_at=at(10)),
        ]
    )
    secrets = Registry(state).endpoint("ep-1")["secrets"]  # type: ignore[index]
    assert [(s["id"], s["expires_at"]) for s in secrets] == [
        ("s1", at(10)),
        ("s2", at(10)),
        ("s3", None),
    ]


def test_a_deleted_endpoint_is_gone_but_its_id_stays_used() -> None:
    # ep-1 registered then deleted: not an endpoint any more, yet "ep-1" may not be reused.
    state = fold(
        [
            partner(),
            endpoint("ep-1", url="https://x.example"),
            status("endpoint_deleted", "ep-1", "acme"),
        ]
    )
    registry = Registry(state)
    assert "ep-1" not in registry.endpoints
    assert registry.partner_endpoints() == []
    assert registry.used("ep-1")
    assert not registry.used("ep-2")


def test_deleting_a_partner_retires_its_endpoints_and_its_keys_stop_resolving() -> None:
    # acme has ep-1 and key k1 (hash "h1"); globex has ep-2 and key k2 ("h2"). Acme deleted:
    # ep-1 gone (its id used), "h1" resolves to nobody; globex's keep working.
    state = fold(
        [
            partner("acme"),
            partner("globex"),
            endpoint("ep-1", "acme", url="https://a.example"),
            endpoint("ep-2", "globex", url="https://g.example"),
            key("key_issued", "k1", "acme", role="supplier", hash="h1"),
            key("key_issued", "k2", "globex", role="customer", hash="h2"),
            {"action": "partner_deleted", "partner_id": "acme", "by": "admin"},
        ]
    )
    registry = Registry(state)
    assert registry.partner("acme") is None
    assert registry.endpoint("ep-1") is None
    assert registry.used("ep-1")
    assert registry.key_owner("h1") is None
    assert [e["endpoint_id"] for e in registry.partner_endpoints()] == ["ep-2"]
    assert registry.key_owner("h2") == ("globex", "customer")


def test_a_revoked_key_resolves_to_none_an_active_one_to_its_partner_and_role() -> None:
    # k1 ("h1") and k2 ("h2", role supplier) issued, k1 revoked: "h1" → None,
    # "h2" → ("acme", "supplier"); a key issued without a role takes the partner's kind.
    state = fold(
        [
            partner(kind="customer"),
            key("key_issued", "k1", role="supplier", hash="h1"),
            key("key_issued", "k2", role="supplier", hash="h2"),
            key("key_issued", "k3", hash="h3"),
            key("key_revoked", "k1"),
        ]
    )
    registry = Registry(state)
    assert registry.key_owner("h1") is None
    assert registry.key_owner("h2") == ("acme", "supplier")
    assert registry.key_owner("h3") == ("acme", "customer")
    assert registry.key_owner("unknown") is None
    assert registry.partner("acme")["keys"]["k1"]["revoked_at"] == at(10)  # type: ignore[index]


def test_a_config_endpoints_status_is_kept_but_it_is_no_partner_endpoint() -> None:
    # "erp-hook" is a [[webhook]] of the config file (partner_id None): paused at 06:00,
    # resumed at 07:00, disabled at 08:00 → its status is kept ("disabled", with the reason),
    # but it is not listed among the partners' endpoints.
    registry_after: list[str] = []
    state = empty()
    for hour, change in enumerate(
        [
            status("endpoint_paused", "erp-hook", None, "maintenance"),
            status("endpoint_resumed", "erp-hook", None),
            status("endpoint_disabled", "erp-hook", None, "410 Gone"),
        ],
        start=6,
    ):
        state = apply_change(state, change, at(hour))
        registry_after.append(Registry(state).status("erp-hook"))
    assert registry_after == ["paused", "active", "disabled"]
    registry = Registry(state)
    entry = registry.endpoint("erp-hook")
    assert entry is not None
    assert entry["partner_id"] is None
    assert (entry["status_reason"], entry["status_at"]) == ("410 Gone", at(8))
    assert registry.partner_endpoints() == []


def test_pausing_a_partner_endpoint_that_does_not_exist_creates_nothing() -> None:
    # A pause naming acme's "ep-9", which acme does not have, is no config endpoint either.
    state = fold([partner(), status("endpoint_paused", "ep-9", "acme")])
    assert Registry(state).endpoint("ep-9") is None


def test_the_status_of_an_unknown_endpoint_is_active() -> None:
    assert Registry(empty()).status("never-heard-of") == "active"
    assert Registry({}).status("never-heard-of") == "active"


def test_the_fold_never_changes_the_state_it_is_given() -> None:
    # Every action applied to a state with a partner, a key, an endpoint and a config
    # endpoint's status: the given state is, each time, as it was.
    base = fold(
        [
            partner(name="Acme"),
            key("key_issued", "k1", hash="h1"),
            endpoint("ep-1", url="https://x.example", secret={"id": "s1", "fingerprint": "f"}),
            status("endpoint_paused", "erp-hook", None),
        ]
    )
    snapshot = copy.deepcopy(base)
    for change in [
        partner(name="Renamed", customers=["C-1"]),
        {"action": "partner_deleted", "partner_id": "acme", "by": "admin"},
        key("key_issued", "k2", hash="h2"),
        key("key_revoked", "k1"),
        endpoint("ep-1", url="https://y.example", events=["order.completed"]),
        endpoint("ep-2", url="https://z.example"),
        status("endpoint_deleted", "ep-1", "acme"),
        rotated("ep-1", "s2", old_expire_at=at(20)),
        status("endpoint_paused", "ep-1", "acme"),
        status("endpoint_resumed", "erp-hook", None),
        status("endpoint_disabled", "new-config-hook", None),
    ]:
        after = apply_change(base, change, at(12))
        assert base == snapshot, change["action"]
        assert after["changes"] == base["changes"] + 1


def test_replaying_the_same_changes_from_empty_gives_the_same_state() -> None:
    changes = [
        partner(name="Acme", kind="supplier"),
        key("key_issued", "k1", role="supplier", hash="h1"),
        endpoint("ep-1", url="https://x.example", secret={"id": "s1", "fingerprint": "f"}),
        rotated("ep-1", "s2", old_expire_at=at(11)),
        status("endpoint_paused", "ep-1", "acme", "holiday"),
        status("endpoint_disabled", "erp-hook", None, "410"),
        endpoint("ep-2", url="https://y.example"),
        status("endpoint_deleted", "ep-2", "acme"),
        key("key_revoked", "k1"),
    ]
    first, second = fold(changes), fold(changes)
    assert first == second
    assert first["changes"] == len(changes)
    assert first["retired"] == ["ep-2"]
