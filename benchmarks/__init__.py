"""Benchmarks: named measurements whose results are committed under results/."""
