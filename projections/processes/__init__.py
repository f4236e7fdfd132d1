"""Processes that act on the log: they read views and rules and publish what they conclude
(the forecast watch; next the delivery outbox and the audit sealer)."""
