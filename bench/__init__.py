"""Benchmarks, run by hand (``python -m bench.bench_explain``) or by ``make bench``; never by the tests."""
