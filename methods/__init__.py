"""One file per method; each registers itself with ``harness.registry.register_method``."""
