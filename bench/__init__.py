"""Reproducible benchmarks: each script prints one JSON line per run; figures go to RESULTS.md."""
