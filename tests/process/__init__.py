"""The daemon as a systemd service: notify, activation, fd store, uevents, config."""
