"""Training data: annotation index, frame preprocessing, dataset + collation, batch sampler."""
