"""The hot path: eventfds to client sockets, in one of two interchangeable implementations."""
