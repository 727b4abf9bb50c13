"""The process around the daemon: sockets, signals, systemd (notify, activation, fd store)."""
