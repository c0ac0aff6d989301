"""Benchmarks: measured, not tested (speed of every strategy; the few-shot grid comes later)."""
