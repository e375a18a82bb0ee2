"""Frozen-encoder features: the store, the encoders and fingerprints, precompute, sources for the trainer."""
