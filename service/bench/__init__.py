"""Benchmarks of the read path, ingest and the worker, each next to its baseline.

They start real processes and servers around the roles, and say where numbers came from.
May import: anything in service but cli and demo (the composition root)."""
