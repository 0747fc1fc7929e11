"""fedstream: federated learning for large models over streamed gRPC."""

__version__ = "0.1.0"
