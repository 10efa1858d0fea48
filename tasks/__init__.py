"""Ingest stages: plain functions, each wrapped as a thin Prefect task in flows/."""
