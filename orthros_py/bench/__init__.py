"""Benchmark runners and their rendering (the workloads they start live in
``orthros_py.workloads``)."""
