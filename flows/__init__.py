"""Stream ingestion dataflows (Bytewax): ingest and retry."""

__all__: list[str] = []
