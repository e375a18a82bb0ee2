"""Training: the trainer loop, the DeepSpeed engine and step, process groups, metrics, checkpoints, stop."""
