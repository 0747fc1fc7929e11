"""The wire format: a model or an update is a manifest (`manifest.py`) and then the
tensors' bytes as one stream (`stream.py`), cut into chunk messages framed by hand
(`framing.py`). The uplink compression is a separate matter (`common/codecs/`)."""
