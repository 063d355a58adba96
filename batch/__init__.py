"""Batch ingestion: backfill from Kafka time ranges, file loads, scheduled jobs."""

__all__: list[str] = []
