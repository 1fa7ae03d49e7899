"""Training: the single training loop, its checkpoints, logs and evaluation (the steps it drives are dpllm.steps)."""
