"""Benchmark sweeps: named suites of cases (``cases``) run by one resumable driver (``driver``)."""
