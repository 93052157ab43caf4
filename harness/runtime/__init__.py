"""Process and device helpers (interrupts, device and memory, precision, sync counting): no other layer of the harness below it."""
