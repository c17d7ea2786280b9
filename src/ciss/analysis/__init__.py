"""Analysis: metrics, forgetting diagnosis, benchmarks and reports."""
