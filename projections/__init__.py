"""Everything the business sees, derived from the stored events, in three parts that change for
different reasons (``make test`` checks their imports with import-linter, see pyproject.toml):

- ``projections.rules``: the production rules (shift calendar, counters, machine timeline,
  ISO 22400 OEE, order progress, delivery forecast, the plant configuration and its history).
  Pure functions over facts: no I/O, so each rule is tested with hand-computed examples.
- ``projections.views``: the read models that keep tables (the runner, its database, the facts
  and order views), each recording its position in the same transaction as its rows.
- ``projections.processes``: what acts on the log (the forecast watch; next the delivery outbox
  and the audit sealer).

``projections.config`` reads the ``[plant]`` section of the config file.
"""
