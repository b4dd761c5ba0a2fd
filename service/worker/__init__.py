"""The worker role: dirty users in, stabilized embeddings out, in pipelined micro-batches.

ONNX Runtime, the serving model, the registry watcher, the role loop, the alignment fit.
May import: service.core, service.store, service.settings, service.metrics, models."""
