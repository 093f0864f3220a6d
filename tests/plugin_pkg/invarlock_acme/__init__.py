"""Example InvarLock plugin (used by InvarLock's own tests)."""
