"""Stream ingestion dataflows (Bytewax): ingest and retry."""
