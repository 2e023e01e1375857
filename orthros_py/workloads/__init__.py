"""What tests, the demo and the benchmarks start: an echo service with its clients (``echo``)
and a container of UNIX socket pairs (``unixpair``), each run as
``python -m orthros_py.workloads.NAME``."""
