"""Per-rank bodies of tests/distributed, importable by module name from spawned ranks."""
