"""The ingest role: Kafka events in, per-user feature states out (exactly once in effect).

The feature updater and consume loop, the Kafka source and sink, the mock broker, producers.
May import: service.core, service.store, service.settings, service.metrics, models."""
