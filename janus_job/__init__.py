"""janus-train: Kubernetes-native training of JanusVLN-style models."""

__version__ = "0.1.0"
