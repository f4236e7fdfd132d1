"""Outgoing partner webhooks, following Standard Webhooks 1.0 (https://www.standardwebhooks.com).

`signing` builds the `webhook-id` / `webhook-timestamp` / `webhook-signature` headers.
"""
