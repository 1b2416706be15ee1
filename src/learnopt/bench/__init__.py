"""Benchmarks against tuned hand-designed baselines."""
