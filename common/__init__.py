"""Shared pieces of fedstream: wire contract and format, compression codecs, config, checkpoints."""
