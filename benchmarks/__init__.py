"""Benchmarks of the provider against the approaches users take without it (issue 6); see README.md."""
