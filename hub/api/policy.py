"""Who may do what through the API: the roles, who may read, and which event families each role
may send. Every route admits roles from here (``hub.api.deps`` turns them into dependencies);
nothing else in the API names a role.

The roles (keys from ``MES_HUB_API_KEYS`` or the config file):

- ``admin``: everything;
- ``operator``: reads, and sends operator events (a tablet at the machine);
- ``erp``: reads, and sends ERP order events;
- ``viewer``: reads only (a wall screen showing the plant board, ``hub.ui``);
- ``auditor``: reads, and the audit log, checkpoints and proofs (``/api/v1/audit``); writes
  nothing;
- ``supplier``, ``customer``: a partner's key (issued by ``POST /partners/{id}/keys``): its own
  partner, webhook endpoints and their deliveries, nothing else.
"""

from __future__ import annotations

from contracts import Stream
from hub.settings import Role

READERS: tuple[Role, ...] = ("admin", "operator", "erp", "auditor", "viewer")

# Which event families each role may send: an operator tablet must not release ERP orders, and
# only the hub itself publishes its own ("hub") events.
SENDS: dict[Role, frozenset[Stream]] = {
    "admin": frozenset({"machine", "operator", "erp"}),
    "operator": frozenset({"operator"}),
    "erp": frozenset({"erp"}),
}
EVENT_WRITERS: tuple[Role, ...] = tuple(SENDS)
# Who sees and retries what the ERPs were told (production confirmations).
ERP_DESK: tuple[Role, ...] = ("admin", "erp")
# Who registers partners, issues their keys, and edits any endpoint.
PARTNER_DESK: tuple[Role, ...] = ("admin",)
# A partner's own keys; with the admin, who reads an endpoint's deliveries, pauses, resumes,
# replays and redelivers (a partner's for its own endpoints only).
PARTNERS: tuple[Role, ...] = ("supplier", "customer")
WEBHOOK_USERS: tuple[Role, ...] = (*PARTNER_DESK, *PARTNERS)
# Who reads the audit log (who did what, and when the hub knew it), its checkpoints and proofs:
# not an operator's tablet, which has no business with who else did what.
AUDITORS: tuple[Role, ...] = ("admin", "auditor")


def may_send(role: Role, stream: Stream) -> bool:
    return stream in SENDS.get(role, frozenset())


# The floor's screens (``hub.ui``): who may sign in to them, and who may open the operator
# station (which taps reasons, starts orders and reports scrap) and the admin pages.
SCREEN_USERS: tuple[Role, ...] = ("admin", "operator", "viewer")
STATION_USERS: tuple[Role, ...] = ("admin", "operator")
SCREEN_ADMINS: tuple[Role, ...] = ("admin",)
