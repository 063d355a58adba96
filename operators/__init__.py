"""Ingestion operators as plain functions: decode, dispatch, aggregate, write, commit."""
