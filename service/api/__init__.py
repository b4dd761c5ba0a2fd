"""The read API role: embeddings to rankers over HTTP and gRPC, one store round trip a read.

Read semantics, coalescer, hot cache, refresh requests, cold start, the front ends, servers.
May import: service.core, service.store, service.settings, service.metrics, models."""
