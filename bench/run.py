"""Benchmark entry point (`make bench`)."""

print("no benchmarks yet: see BENCHMARKS.md for what is planned")
