"""Workloads and measurement shared by the demo, the benchmarks in scripts/ and the tests."""
