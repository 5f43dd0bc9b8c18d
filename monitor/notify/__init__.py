"""Notification: HTTP sinks, the dispatcher with its retry policy (``sinks``), and the
outbox consumer with the delivery ledger on a compacted topic (``outbox``)."""
