"""Reliability and security suite (issue 9): crashes, broker restarts, rebalances,
TLS/SASL, PHI hygiene, failing sinks. ``run_long.py`` runs the long mode."""
