"""Processes of the data plane: producers (ZMQ PUSH) and consumer pools (PULL)."""
