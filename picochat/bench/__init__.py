"""Benchmarks run through the Engine protocol: the load generator behind `picochat bench`."""
