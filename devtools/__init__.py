"""Developer-side helpers shared by tests, benchmarks and the demo (not shipped)."""
