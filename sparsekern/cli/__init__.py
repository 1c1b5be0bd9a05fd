"""Measurement code shared by the benchmarks in bench/ (the machine, alternating timing, peak memory,
the block-sparse layer cases)."""
