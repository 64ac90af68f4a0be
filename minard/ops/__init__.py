"""Shift operations: log server, credentials, program registry, pinger, monitors."""
