"""Reliability and security checks of the stream: crashes, load, bad input, damaged data, killed jobs.

Each script runs as a module from the repository root, e.g.
`.venv/bin/python -m benchmarks.reliability.crash_loop`; `harness` holds what they share.
"""
