"""The training engine: config resolution, set-up, the loop, selection, checkpoints and resume."""
