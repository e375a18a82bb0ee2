"""Putting a job on a cluster: Helm rendering, the PyTorchJob entrypoint (`launch`), the starter that orders
precompute -> train, and the upgrade flow."""
