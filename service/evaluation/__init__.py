"""``userembed evaluate``: what SOAP promises, measured on our own pipeline (docs/report.md).

Offline quality, live freshness and read latency on the running processes, the report.
May import: anything in service but cli and demo (the composition root)."""
