"""The local demo: synthetic data, tiny checkpoints and tokenizer, the end-to-end run."""
