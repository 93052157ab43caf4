"""The run-config schema, reading --set values and files, and where outputs go."""
