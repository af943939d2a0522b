"""Local serving: the Open Inference Protocol v2 HTTP API, dynamic batching and metrics."""
