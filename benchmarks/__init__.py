"""Benchmark scripts (runnable, not tests): sampling, training, quality, gpu; see README.md."""
