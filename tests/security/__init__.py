"""Access control, claim, limits, malformed input, fuzzing and soak."""
