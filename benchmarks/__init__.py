"""Benchmarks of the provider against the approaches users take without it; see README.md."""
