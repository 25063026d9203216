"""Benchmarks, run by hand (``python -m bench.bench_explain``) or by ``make bench``; the test suite
runs only their ``--smoke`` modes (tests/test_bench.py), so that an API change fails a test."""
