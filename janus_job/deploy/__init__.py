"""Putting a job on a cluster: Helm rendering and the PyTorchJob entrypoint (`launch`)."""
