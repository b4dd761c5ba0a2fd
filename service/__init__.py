"""userembed: online user embeddings (SUM/SOAP style), a package per role.

core (pure) <- store <- ingest | worker | api <- bench, evaluation <- cli, demo;
settings and metrics are shared by all but core."""
