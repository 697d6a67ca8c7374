"""Retrieval-augmented generation: ingestion, retrieval and evaluation."""
