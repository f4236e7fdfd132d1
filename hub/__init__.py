"""The core of mes-hub: settings, domain, event store, ingest, NATS wiring; and the entry points
(API, CLI, the ``bootstrap`` composition root)."""
