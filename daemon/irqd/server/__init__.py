"""The Trio control plane: the daemon, its clients, their requests, the vector table."""
