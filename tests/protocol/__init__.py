"""Tests of irqproto, the wire protocol library."""
