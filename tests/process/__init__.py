"""The daemon as a systemd service (issue 5): notify, activation, fd store, uevents, config."""
