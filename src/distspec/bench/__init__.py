"""Benchmark harness: contenders run alternately in one process; JSON + PNG out."""
