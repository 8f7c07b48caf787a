"""Helpers of ``benchmarks/bench_spikes.py``: tasks, faults, runs, evaluation, report."""
