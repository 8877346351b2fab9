"""Training tools: config, loop, checkpoints, distributed, CLI (needs the `train` extra)."""
