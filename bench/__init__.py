"""Benchmarks of the key requestor on the real local stack: `uv run python -m bench`."""
