"""Generated protobuf and gRPC stubs."""
