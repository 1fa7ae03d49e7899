"""Training: the private step as named stages, and the single training loop."""
