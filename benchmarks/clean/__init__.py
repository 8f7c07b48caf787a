"""The clean-run benchmark's parts: tasks, arms, runs and the tables (``bench_clean.py``)."""
