"""Shared state: the Store Protocol, its in-memory and Redis backends, key naming.

Also the throwaway redis-server that tests and benchmarks start.
May import: service.core (and service.settings, service.metrics)."""
