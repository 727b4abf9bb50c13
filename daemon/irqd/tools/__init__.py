"""Operator tools: the CLI and what only it runs (top, ping, watch rendering, the demo)."""
