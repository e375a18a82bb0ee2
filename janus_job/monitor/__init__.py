"""GPU balance: per-rank stats files written by the trainer and the sidecar that aggregates them."""
