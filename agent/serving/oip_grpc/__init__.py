"""The Open Inference Protocol v2 over gRPC: the proto, its compiled descriptors and message classes."""
