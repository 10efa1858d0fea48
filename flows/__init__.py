"""Prefect flows: ingest (audio -> shards) and train (shards -> CSM)."""
