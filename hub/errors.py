"""The hub's own errors, under one root, so a caller can catch whatever the hub raises on purpose
without naming the libraries underneath (eventsourcing, psycopg, nats-py).

Exception tree::

    MesHubError
    ├── ConcurrentWrite
    ├── StoreUnavailable     (hub.store)
    └── ConfigError          (hub.settings)
        ├── PlantConfigError (projections.config)
        └── AdapterConfigError (adapters.machines.config)

- ``ConcurrentWrite``: the store refused a commit because another writer got there first — an
  aggregate's version or a received event's dedupe key is already taken (another ingest
  partition wrote the same order, or this very batch was committed after all when a connection
  was lost during COMMIT). Nothing of the refused commit is stored; reload and apply again.
  ``EventStore.commit`` raises it in place of the library's ``IntegrityError`` (kept as its
  ``__cause__``).

- ``StoreUnavailable`` (in ``hub.store``): the store's PostgreSQL does not answer or refuses
  the hub; one line naming where and why, never the password. The CLI prints it and exits 1 at
  start; while running, its log line replaces the traceback, and an API read answers 503.

- ``ConfigError`` (in ``hub.settings``): a setting that cannot be used, naming its source (a file
  or an environment variable), the key and the reason.

This module imports nothing, so every part of the hub, the core included, can raise and catch
these. (``contracts.ContractViolation`` stays in ``contracts``, which imports nothing of ours.)
"""

from __future__ import annotations


class MesHubError(Exception):
    """The root of every error the hub raises on purpose."""


class ConcurrentWrite(MesHubError):
    """Another writer committed first: nothing of this commit was stored."""
