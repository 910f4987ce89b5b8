"""The training engine: optimisation schedule, the epoch loop, checkpoints."""
