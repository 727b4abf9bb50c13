"""Operator-facing tests: ``top``, ``ping``, and the clients in other languages."""
