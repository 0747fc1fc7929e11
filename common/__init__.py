"""Shared pieces of fedstream: wire contract, tensor codec, config, checkpoints."""
