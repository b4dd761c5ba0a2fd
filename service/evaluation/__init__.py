"""``userembed evaluate``: what SOAP promises, measured on our own pipeline (docs/report.md)."""
